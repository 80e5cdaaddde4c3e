"""Who may call what: every route of the predictor either requires a scope or is on the short
list of open ones; unauthenticated and wrong-scope calls are refused on every protected route
(401/403, as the OpenAPI document says); body and row limits; `sluice serve` refuses to listen
beyond loopback while a scope is open to anyone."""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from core.errors import ExitCode, SettingsError
from core.settings import load_settings
from examples.delivery.features import delivery_eta
from models.registry import ModelRegistry
from serving.app import create_app
from serving.auth import Scope, route_scopes
from tests.helpers.serving import ADMIN_TOKEN, FakeProducer, FakeReader, trained_registry

PREDICT_TOKEN = "test-predict-token-0123456789"
FEEDBACK_TOKEN = "test-feedback-token-0123456789"
TOKENS = {Scope.ADMIN: ADMIN_TOKEN, Scope.PREDICT: PREDICT_TOKEN, Scope.FEEDBACK: FEEDBACK_TOKEN}
# Open to anyone, by decision: probes, scrapers and the API's own documentation.
OPEN_ROUTES = {
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("GET", "/v2"),  # OIP server metadata and health: probed without credentials
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
}
ROW = {"restaurant_id": "r001", "zone_id": "z1", "distance_km": 2.0, "hour_of_day": 12, "items": 2}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("auth") / "models"
    trained_registry(root, delivery_eta)
    return root


def app_for(models_dir: Path, **overrides: Any) -> FastAPI:
    # Each app its own log directory: one predictor at a time holds one (module-scoped apps
    # outlive the per-test directory conftest sets).
    log_dir = tempfile.mkdtemp(prefix="log-", dir=models_dir.parent)
    settings = load_settings(
        models_dir=str(models_dir),
        serve_models=["delivery_eta"],
        prediction_log_dir=log_dir,
        **overrides,
    )
    return create_app(
        settings,
        reader=FakeReader(),
        registry=ModelRegistry(str(models_dir)),
        producer=FakeProducer(),
    )


@pytest.fixture(scope="module")
def client(models_dir: Path) -> Iterator[TestClient]:
    app = app_for(
        models_dir,
        admin_tokens=[ADMIN_TOKEN],
        predict_tokens=[PREDICT_TOKEN],
        feedback_tokens=[FEEDBACK_TOKEN],
    )
    with TestClient(app) as client:
        yield client


def endpoints(app: FastAPI) -> list[tuple[str, str, set[Scope]]]:
    """(method, path, scopes) of every route the app answers, read from app.routes."""
    out = []
    for route in app.routes:
        path = getattr(route, "path", None)
        assert path is not None, f"a route without a path: {route!r}"
        scopes = route_scopes(route) if isinstance(route, APIRoute) else set()
        for method in sorted(getattr(route, "methods", None) or {"*"}):
            if method != "HEAD":
                out.append((method, path, scopes))
    return out


def protected(app: FastAPI) -> list[tuple[str, str, Scope]]:
    return [(m, p, next(iter(s))) for m, p, s in endpoints(app) if s]


def concrete(path: str) -> str:
    """A path with its parameters filled: versions 1, names the served model."""
    return re.sub(
        r"\{([^}]+)\}",
        lambda m: "1" if "version" in m.group(1) else "delivery_eta",
        path,
    )


def call(client: TestClient, method: str, path: str, headers: dict[str, str]) -> Any:
    body: dict[str, Any] | None = {} if method in ("POST", "PUT", "PATCH") else None
    return client.request(method, concrete(path), json=body, headers=headers)


def test_every_route_is_protected_or_open_by_decision(client):
    for method, path, scopes in endpoints(client.app):
        assert scopes or (method, path) in OPEN_ROUTES, (
            f"{method} {path} requires no scope: add dependencies=[require(Scope...)] "
            "(serving/auth.py) or, if it must be open, add it to OPEN_ROUTES"
        )
        assert len(scopes) <= 1, (method, path, scopes)
        if method != "GET" and path.startswith(("/models/", "/v2/repository")):
            assert scopes == {Scope.ADMIN}, f"{method} {path} manages models: admin scope"
    by_route = {(m, p): s for m, p, s in protected(client.app)}
    assert by_route[("POST", "/predict")] is Scope.PREDICT
    assert by_route[("POST", "/feedback")] is Scope.FEEDBACK
    assert by_route[("GET", "/models")] is Scope.PREDICT
    assert by_route[("POST", "/models/{name}/versions/{version}:promote")] is Scope.ADMIN


def test_unauthenticated_and_wrong_scope_calls_are_refused_on_every_protected_route(client):
    routes = protected(client.app)
    assert len(routes) >= 4
    wrong = {
        Scope.ADMIN: [PREDICT_TOKEN, FEEDBACK_TOKEN],
        Scope.PREDICT: [FEEDBACK_TOKEN],
        Scope.FEEDBACK: [PREDICT_TOKEN],
    }
    for method, path, scope in routes:
        where = f"{method} {path}"
        for headers in (
            {},
            bearer("not-a-token-anyone-issued"),
            bearer(ADMIN_TOKEN + "x"),
            {"Authorization": f"Basic {ADMIN_TOKEN}"},
            {"Authorization": "Bearer"},
        ):
            answer = call(client, method, path, headers)
            assert answer.status_code == 401, (where, headers, answer.text)
            assert answer.headers["www-authenticate"] == "Bearer", where
            assert answer.json()["error"] == "unauthenticated", where
        for token in wrong[scope]:
            answer = call(client, method, path, bearer(token))
            assert answer.status_code == 403, (where, answer.text)
            assert answer.json() == {
                "error": "forbidden",
                "detail": f"the bearer token does not have scope {scope}",
            }
        for token in {TOKENS[scope], ADMIN_TOKEN}:  # admin has every scope
            answer = call(client, method, path, bearer(token))
            assert answer.status_code not in (401, 403), (where, answer.text)
            assert answer.status_code < 500, (where, answer.text)


def test_the_right_token_gets_real_answers(client):
    predicted = client.post("/predict", json={"rows": [ROW]}, headers=bearer(PREDICT_TOKEN))
    assert predicted.status_code == 200, predicted.text
    prediction_id = predicted.json()["predictions"][0]["prediction_id"]
    fed = client.post(
        "/feedback",
        json={"prediction_id": prediction_id, "label": 600.0},
        headers=bearer(FEEDBACK_TOKEN),
    )
    assert fed.status_code == 202, fed.text
    assert fed.json()["matched"]
    promoted = client.post("/models/delivery_eta/versions/1:promote", headers=bearer(ADMIN_TOKEN))
    assert promoted.status_code == 200, promoted.text
    assert client.get("/health").status_code == 200  # open routes need nothing
    assert client.get("/metrics").status_code == 200


def test_openapi_documents_the_bearer_scheme_and_401_403(client):
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["HTTPBearer"]["description"],
    }
    for method, path, _scope in protected(client.app):
        operation = spec["paths"][path][method.lower()]
        assert operation["security"] == [{"HTTPBearer": []}], (method, path)
        assert {"401", "403"} <= set(operation["responses"]), (method, path)
    for method, path in OPEN_ROUTES & {(m, p) for m, p, _ in endpoints(client.app)}:
        operation = spec["paths"].get(path, {}).get(method.lower(), {})
        assert "security" not in operation
        assert "401" not in operation.get("responses", {})


def test_optional_scopes_are_open_and_admin_is_disabled_without_tokens(models_dir):
    with TestClient(app_for(models_dir)) as client:
        assert client.post("/predict", json={"rows": [ROW]}).status_code == 200
        assert client.get("/models").status_code == 200
        fed = client.post("/feedback", json={"prediction_id": "p", "label": 1.0})
        assert fed.status_code == 202
        for headers in ({}, bearer(ADMIN_TOKEN)):
            answer = client.post("/models/delivery_eta/versions/1:promote", headers=headers)
            assert answer.status_code == 403
            assert "admin routes are disabled: set SLUICE_ADMIN_TOKENS" in answer.json()["detail"]
    # Only predict has tokens: feedback stays open, predict is closed.
    with TestClient(app_for(models_dir, predict_tokens=[PREDICT_TOKEN])) as client:
        assert client.post("/predict", json={"rows": [ROW]}).status_code == 401
        fed = client.post("/feedback", json={"prediction_id": "p", "label": 1.0})
        assert fed.status_code == 202


def test_a_token_listed_for_two_scopes_has_both(models_dir):
    app = app_for(models_dir, predict_tokens=[PREDICT_TOKEN], feedback_tokens=[PREDICT_TOKEN])
    with TestClient(app) as client:
        headers = bearer(PREDICT_TOKEN)
        assert client.post("/predict", json={"rows": [ROW]}, headers=headers).status_code == 200
        fed = client.post("/feedback", json={"prediction_id": "p", "label": 1.0}, headers=headers)
        assert fed.status_code == 202
        promote = client.post("/models/delivery_eta/versions/1:promote", headers=headers)
        assert promote.status_code == 403


def test_tokens_are_never_logged_or_shown(client, caplog):
    settings = client.app.state.predictor.settings
    for text in (repr(settings), str(settings)):
        assert all(token not in text for token in TOKENS.values())
    with caplog.at_level(logging.DEBUG):
        for token in (*TOKENS.values(), "a-wrong-token-0123456789"):
            for method, path, _ in protected(client.app):
                call(client, method, path, bearer(token))
    logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert not any(t in logged for t in (*TOKENS.values(), "a-wrong-token-0123456789"))


@pytest.mark.parametrize(
    "value",
    ["short", "has space in the middle of it", '["0123456789abcdef", 7]', "é" * 20],
)
def test_a_bad_token_setting_names_the_variable_not_the_value(monkeypatch, value):
    monkeypatch.setenv("SLUICE_ADMIN_TOKENS", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("invalid setting SLUICE_ADMIN_TOKENS: token ")
    assert "\n" not in message
    assert value not in message


def test_tokens_as_people_write_them(monkeypatch):
    monkeypatch.setenv("SLUICE_PREDICT_TOKENS", f" {PREDICT_TOKEN} , {FEEDBACK_TOKEN}")
    monkeypatch.setenv("SLUICE_ADMIN_TOKENS", f'["{ADMIN_TOKEN}"]')
    settings = load_settings()
    assert [t.get_secret_value() for t in settings.predict_tokens] == [
        PREDICT_TOKEN,
        FEEDBACK_TOKEN,
    ]
    assert [t.get_secret_value() for t in settings.admin_tokens] == [ADMIN_TOKEN]


# --- limits ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(models_dir: Path) -> Iterator[TestClient]:
    with TestClient(app_for(models_dir, max_request_bytes=4096, max_request_rows=3)) as client:
        yield client


def test_a_body_above_the_limit_is_413_before_parsing(limited):
    big = b'{"rows": [' + b" " * 5000 + b"]}"
    answer = limited.post("/predict", content=big, headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert answer.json()["error"] == "request_too_large"
    assert "(5012 bytes) is above the limit of 4096 bytes" in answer.json()["detail"]

    def chunked(total: int) -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding chunked
        yield b'{"rows": ['
        for _ in range(total // 1000):
            yield b" " * 1000
        yield b"{}]}"

    answer = limited.post(
        "/predict", content=chunked(100_000), headers={"content-type": "application/json"}
    )
    assert answer.status_code == 413
    assert "more than 4096 bytes" in answer.json()["detail"]
    rows = b'{"rows": [' + orjson_row() + b"]}"
    small = limited.post(
        "/predict", content=iter([rows[:5], rows[5:]]), headers={"content-type": "application/json"}
    )
    assert small.status_code == 200, small.text  # a chunked body within the limit is replayed


def orjson_row() -> bytes:
    import orjson

    return orjson.dumps(ROW)


def test_more_rows_than_the_setting_is_422_naming_rows(limited):
    answer = limited.post("/predict", json={"rows": [ROW] * 4})
    assert answer.status_code == 422
    assert answer.json()["detail"] == [
        {"field": "rows", "reason": "at most 3 rows per request (setting max_request_rows), got 4"}
    ]
    assert limited.post("/predict", json={"rows": [ROW] * 3}).status_code == 200


# --- sluice serve --------------------------------------------------------------------------


def serve(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str, **env: str
) -> tuple[int, str]:
    """`sluice serve ARGS` as the console script runs it: (exit code, stdout + stderr)."""
    from cli.main import run

    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        code = run(["serve", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_serve_refuses_to_listen_beyond_loopback_without_tokens(tmp_path, monkeypatch, capsys):
    for name in ("SLUICE_PREDICT_TOKENS", "SLUICE_FEEDBACK_TOKENS", "SLUICE_ADMIN_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLUICE_CONFIG", "")
    monkeypatch.setenv("SLUICE_MODELS_DIR", str(tmp_path / "empty-registry"))
    code, output = serve(monkeypatch, capsys, "--host", "0.0.0.0")
    assert code == ExitCode.USAGE, output
    assert output.splitlines() == [
        "error: refusing to listen on 0.0.0.0 with predict and feedback open to anyone: set "
        "SLUICE_PREDICT_TOKENS and SLUICE_FEEDBACK_TOKENS, or pass --allow-unauthenticated"
    ]
    # Past the check, serve stops at the empty registry (exit 9), before binding anything.
    both = {"SLUICE_PREDICT_TOKENS": PREDICT_TOKEN, "SLUICE_FEEDBACK_TOKENS": FEEDBACK_TOKEN}
    for args, env in [
        (("--host", "127.0.0.1"), {}),
        (("--host", "::1"), {}),
        (("--host", "0.0.0.0", "--allow-unauthenticated"), {}),
        (("--host", "10.1.2.3"), both),
    ]:
        code, output = serve(monkeypatch, capsys, *args, **env)
        assert code == ExitCode.NOT_FOUND, (args, output)
        assert "has no production version" in output
        warned = "listening beyond loopback without tokens" in output
        assert warned == ("--allow-unauthenticated" in args), (args, output)
        assert PREDICT_TOKEN not in output
    code, output = serve(
        monkeypatch, capsys, "--host", "0.0.0.0", SLUICE_PREDICT_TOKENS=PREDICT_TOKEN
    )
    assert code == ExitCode.USAGE
    assert "with feedback open to anyone: set SLUICE_FEEDBACK_TOKENS," in output
