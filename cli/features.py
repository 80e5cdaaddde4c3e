"""`sluice features`: list, describe, validate, diff and apply feature definitions.

list, describe and validate (without Feast) read only features/; diff, apply and validate's
Feast check import Feast (5-8 s) inside the command. Errors print one line naming the
definition and the field, and exit non-zero (2 for definitions, 7 for Feast), never a trace.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from core.errors import ExitCode, SluiceError
from core.settings import Settings, load_settings
from features.definitions import (
    Entity,
    FeatureService,
    FeatureView,
    RequestFeatures,
    duration_name,
)
from features.errors import FeatureDefinitionError
from features.labels import Labels
from features.registry import Registry, load_registry
from features.schema import EventSource, Field

if TYPE_CHECKING:
    from feature_repo.registry_ops import ObjectChange

features_app = typer.Typer(
    help="Feature definitions: list, describe, validate, diff and apply to Feast.",
    no_args_is_help=True,
)
ModuleOption = Annotated[
    str | None,
    typer.Option("--module", help="Definitions module (default: settings.definitions_module)."),
]


def _settings() -> Settings:
    # The parent app's callback has read --config; imported late because cli.main imports us.
    from cli import common as cli

    try:
        return cli.settings()
    except KeyError:  # features_app used on its own
        return load_settings()


def _console() -> Console:
    return Console()  # per command, so that COLUMNS set by the caller applies


@contextmanager
def _reporting_errors() -> Iterator[None]:
    """A SluiceError as one line on stderr and its exit code (also when features_app runs on
    its own, without cli.main around it)."""
    from cli.common import print_error

    try:
        yield
    except SluiceError as exc:
        print_error(str(exc))
        raise typer.Exit(int(exc.exit_code)) from None


def load_definitions(module: str) -> Registry:
    """load_registry, with every failure of the user's module as a FeatureDefinitionError."""
    try:
        return load_registry(module)
    except FeatureDefinitionError:
        raise
    except ValidationError as exc:  # a definition built with a wrong or missing argument
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "-"
        raise FeatureDefinitionError(exc.title, f"in {module}", field, err["msg"]) from None
    except Exception as exc:
        # Importing runs the user's code: any exception there is a broken definitions module.
        raise FeatureDefinitionError(
            "module", module, "import", f"{type(exc).__name__}: {exc}"
        ) from None


def _windows(view: FeatureView) -> str:
    return ", ".join(f"{w.name}/{duration_name(w.slide)}" for w in view.windows)


@features_app.command("list")
def list_(module: ModuleOption = None) -> None:
    """Table of feature views, request features and services."""
    with _reporting_errors():
        registry = load_definitions(module or _settings().definitions_module)
    rows: list[tuple[str, ...]] = [
        (
            view.name,
            view.kind,
            view.entity.name,
            view.source.name,
            _windows(view),
            ", ".join(view.engines),
            duration_name(view.ttl),
        )
        for view in registry.views.values()
    ]
    rows += [
        (r.name, "request", "-", "caller", "-", "-", "-")
        for r in registry.request_features.values()
    ]
    for service in registry.services.values():
        entities = ", ".join(e.name for e in service.entities) or "-"
        views = ", ".join(v.name for v in service.views)
        rows.append((service.name, "service", entities, views or "-", "-", "-", "-"))
    for labels in registry.labels.values():
        entities = ", ".join(labels.entities) or "-"
        rows.append((labels.name, "labels", entities, labels.source.name, "-", "-", "-"))
    console = _console()
    headers = ("name", "kind", "entity", "source", "windows (size/slide)", "engines", "ttl")
    table = Table(*headers)
    for row in rows:
        table.add_row(*row)
    natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
    if natural > console.width:
        # Too narrow for a column each (80 columns): names and kinds stay whole on one line,
        # the rest is one cell that wraps between words, never cut with an ellipsis.
        table = Table()
        table.add_column("name", no_wrap=True)
        table.add_column("kind", no_wrap=True)
        table.add_column("details")
        for row in rows:
            first = ["entities", "views"] if row[1] == "service" else ["entity", "source"]
            keys = [*first, "windows (size/slide)", "engines", "ttl"]
            details = zip(keys, row[2:], strict=True)
            table.add_row(row[0], row[1], "; ".join(f"{k} {v}" for k, v in details if v != "-"))
    console.print(table)


def _readers(registry: Registry, name: str) -> list[str]:
    """Services that read the view or request features called name."""
    return [
        s.name
        for s in registry.services.values()
        if name in {v.name for v in s.views} | {r.name for r in s.request}
    ]


def _describe_view(view: FeatureView, registry: Registry, settings: Settings) -> list[str]:
    source = view.source
    lines = [
        f"[bold]{view.name}[/bold] ({view.kind} feature view) {view.description}",
        f"entity: {view.entity.name} (join key {view.entity.join_key}, from column "
        f"{view.key_column})",
        f"source: {source.name}: topic {source.topic}, event time {source.event_time_field}",
        f"windows (size/slide): {_windows(view)}",
        f"filter: {view.filter or '-'}",
        "derived: " + (", ".join(f"{k} = {v}" for k, v in view.derived.items()) or "-"),
        f"engines: {', '.join(view.engines)}; ttl {duration_name(view.ttl)}; "
        f"online {'yes' if view.online else 'no'}; owner {view.owner or '-'}",
    ]
    services = _readers(registry, view.name)
    inputs = [f"{settings.history_dir / source.name}/ (history, spark)"]
    if view.kind == "stream":
        inputs.insert(0, f"{source.raw_topic} -> ingest -> {source.topic} (flink)")
    online = (
        f"Redis {settings.redis_url_masked}, project {settings.feast_project}, one hash per "
        f"{view.entity.join_key}, fields _ts:{view.name}"
        if view.online
        else "not served online"
    )
    lines += [
        "lineage:",
        *(f"  {i}" for i in inputs),
        f"  -> view {view.name}",
        f"  -> services: {', '.join(services) or '-'}",
        f"  -> offline: {settings.offline_store_dir / view.name}/date=YYYY-MM-DD/part-*.parquet",
        f"  -> online: {online}",
    ]
    return lines


def _features_table(view: FeatureView) -> Table:
    table = Table("feature", "type", "aggregation", "column", "window")
    for spec in view.features():
        table.add_row(
            spec.name,
            spec.dtype.value,
            spec.function.value,
            spec.column or "-",
            f"{spec.window.name} every {duration_name(spec.window.slide)}",
        )
    return table


def _fields_table(fields: Sequence[Field]) -> Table:
    table = Table("field", "type", "nullable", "bounds")
    for f in fields:
        bounded = f.minimum is not None or f.maximum is not None
        bounds = f"[{f.minimum}, {f.maximum}]" if bounded else "-"
        table.add_row(f.name, f.type.value, "yes" if f.nullable else "no", bounds)
    return table


@features_app.command()
def describe(
    name: Annotated[str, typer.Argument(help="A view, service, entity, source or request.")],
    module: ModuleOption = None,
) -> None:
    """Everything about one definition: fields, features, windows, engines and lineage."""
    settings = _settings()
    with _reporting_errors():
        registry = load_definitions(module or settings.definitions_module)
    console = _console()
    try:
        item = registry.get(name)
    except KeyError:
        from cli.common import print_error

        known = ", ".join(sorted(registry.names()))
        print_error(f"no definition {name!r}; known: {known}")
        raise typer.Exit(int(ExitCode.NOT_FOUND)) from None
    if isinstance(item, FeatureView):
        for line in _describe_view(item, registry, settings):
            console.print(line, highlight=False)
        console.print(_features_table(item))
        console.print(f"source fields of {item.source.name}:")
        console.print(_fields_table(item.source.fields))
    elif isinstance(item, FeatureService):
        console.print(f"[bold]{item.name}[/bold] (feature service) {item.description}")
        console.print(f"entities: {', '.join(e.join_key for e in item.entities) or '-'}")
        console.print(f"request features: {', '.join(r.name for r in item.request) or '-'}")
        for view in item.views:
            # Batch views read the parquet history only; stream views the topic as well.
            origin = view.source.topic if view.kind == "stream" else f"history/{view.source.name}"
            console.print(f"  {origin} -> {view.name} -> {item.name}", highlight=False)
        console.print("features, in order:")
        for ref in item.feature_refs():
            console.print(f"  {ref}", highlight=False)
    elif isinstance(item, RequestFeatures):
        console.print(f"[bold]{item.name}[/bold] (request features) {item.description}")
        console.print(f"read by services: {', '.join(_readers(registry, item.name)) or '-'}")
        console.print(_fields_table(item.fields))
    elif isinstance(item, EventSource):
        console.print(f"[bold]{item.name}[/bold] (event source) {item.description}")
        console.print(
            f"topics: {item.raw_topic} -> {item.topic}; key {item.key_field}; "
            f"event time {item.event_time_field}",
            highlight=False,
        )
        views = [v.name for v in registry.views.values() if v.source.name == item.name]
        console.print(f"views: {', '.join(views) or '-'}")
        console.print(_fields_table(item.fields))
    elif isinstance(item, Entity):
        views = [v.name for v in registry.views.values() if v.entity.name == name]
        console.print(f"[bold]{name}[/bold] (entity) join key {item.join_key}. {item.description}")
        console.print(f"views: {', '.join(views) or '-'}")
    elif isinstance(item, Labels):
        console.print(f"[bold]{item.name}[/bold] (training labels) {item.description}")
        console.print(
            f"label {item.source.name}.{item.label} at {item.time_field}; "
            f"trains: {', '.join(item.services)}",
            highlight=False,
        )
        entities = ", ".join(f"{e} <- {c}" for e, c in item.entities.items())
        console.print(f"entities: {entities}", highlight=False)
        request = ", ".join(f"{r} <- {c}" for r, c in item.request.items()) or "-"
        console.print(f"request features: {request}", highlight=False)
        for join in item.joins:
            console.print(
                f"joins {join.source.name} on {join.on}: {', '.join(join.columns)}",
                highlight=False,
            )


@features_app.command()
def validate(
    module: ModuleOption = None,
    feast: Annotated[
        bool, typer.Option(help="Also build the Feast objects (imports Feast, ~5 s).")
    ] = True,
) -> None:
    """Load and check every definition; exit 2 naming the definition and field at fault."""
    settings = _settings()
    name = module or settings.definitions_module
    with _reporting_errors():
        registry = load_definitions(name)
        n_features = sum(len(v.features()) for v in registry.views.values())
        summary = (
            f"{len(registry.entities)} entities, {len(registry.sources)} sources, "
            f"{len(registry.views)} views ({n_features} features), "
            f"{len(registry.request_features)} request features, {len(registry.services)} services"
        )
        if feast:
            from feature_repo.definitions import feast_objects

            summary += f"; Feast translation: {len(feast_objects(registry, settings))} objects"
    _console().print(f"ok: {name}: {summary}", highlight=False)


def _print_changes(changes: Sequence[ObjectChange], console: Console) -> None:
    table = Table("change", "kind", "name", "field", "stored", "declared")
    for change in changes:
        if not change.fields:
            table.add_row(change.change, change.kind, change.name, "", "", "")
        for field in change.fields:
            table.add_row(
                change.change, change.kind, change.name, field.field, field.old, field.new
            )
    console.print(table)


@features_app.command()
def diff(
    module: ModuleOption = None,
    exit_code: Annotated[
        bool, typer.Option("--exit-code", help="Exit 1 when there are changes (for CI).")
    ] = False,
) -> None:
    """What `apply` would change in the Feast registry (settings.feast_registry)."""
    from feature_repo import registry_ops

    settings = _settings()
    console = _console()
    with _reporting_errors():
        changes = registry_ops.plan(
            settings, load_definitions(module or settings.definitions_module)
        )
    if not changes:
        console.print(f"no changes: {settings.feast_registry} matches the definitions")
        return
    _print_changes(changes, console)
    console.print(f"{registry_ops.summary(changes)} (not applied)")
    if exit_code:
        raise typer.Exit(1)


@features_app.command()
def apply(module: ModuleOption = None) -> None:
    """Apply the definitions to the Feast registry (idempotent); prints what changed."""
    from feature_repo import registry_ops

    settings = _settings()
    console = _console()
    with _reporting_errors():
        registry = load_definitions(module or settings.definitions_module)
        changes = registry_ops.apply(settings, registry)
    if not changes:
        console.print(f"nothing to apply: {settings.feast_registry} is up to date")
        return
    _print_changes(changes, console)
    console.print(f"applied: {registry_ops.summary(changes)}")


@features_app.command()
def env(
    show_secrets: Annotated[
        bool,
        typer.Option(
            "--show-secrets", help="Print the Redis password in clear (masked by default)."
        ),
    ] = False,
) -> None:
    """Shell exports that point the `feast` CLI in feature_repo/ where the settings point.

    A Redis password is printed as *** unless --show-secrets is given: use
    `eval "$(sluice features env --show-secrets)"` against a Redis that needs one."""
    from cli.common import print_warning
    from core.logs import scrub
    from feature_repo.config import feast_env

    with _reporting_errors():
        variables = feast_env(_settings())
    masked = {key: scrub(value) for key, value in variables.items()}
    if masked != variables and not show_secrets:
        print_warning("secrets are masked as ***; --show-secrets prints them (for eval)")
    for key, value in (variables if show_secrets else masked).items():
        typer.echo(f"export {key}={shlex.quote(value)}")
