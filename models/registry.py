"""Versioned models on a filesystem or an object store (any pyarrow.fs URI).

Layout under the root (settings.models_dir)::

    <name>/<version>/model.txt        LightGBM's native text format
    <name>/<version>/metadata.json    feature service, feature order, windows, metrics, versions
    <name>/<version>/reference.json   the training reference (optional; monitoring/ reads it)
    <name>/<version>/.claim-<id>      the trainer that allocated the version (see save)
    <name>/production                 the production version number, as text
    <name>/rollout.json               canary, shadows, history of production (models/rollout.py)
    <name>/decisions/<period>.json    `sluice retrain`'s decision for one label period

Versions are 1, 2, 3...; a version counts once its metadata.json exists, which is written last,
so a reader never sees half a model. The training reference (TrainingReference: a compact
distribution of every input feature and of the predictions on the training set, for drift
monitoring) travels with the metadata that ``models.fit`` builds but is stored beside it, so
that listing models stays cheap; versions saved before references existed have none
(``reference()`` returns None). The production pointer is one small object replaced in one
step (rename on a local disk, a single PUT on an object store).

Concurrent trainers (threads, processes, hosts sharing the root) get distinct versions: a save
claims the next free number by writing an empty ``.claim-<random id>`` file into its directory,
then lists that directory; it owns the number only when its claim is the only entry there.
Otherwise it deletes its claim and tries again (after a random pause). Two trainers cannot both
win: the later of the two claims is written after the earlier, so the later trainer's listing
sees the earlier claim (winners never delete theirs); both may lose, and retry. This needs only
read-after-write consistent listings (local disks, S3, GCS), no lock and no conditional write.

The decisions log holds one RetrainDecision per model and label period (what `sluice retrain`
trained, the numbers it compared and whether it promoted); it is written whole in one step,
and a period with a decision is not decided again unless forced.
"""

from __future__ import annotations

import random
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlparse

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import StorageError
from core.settings import Settings
from core.uris import S3Options, filesystem
from models.errors import ModelNotFoundError, ModelRegistryError
from models.rollout import ROLLOUT_FILE, RolloutState

MODEL_FILE = "model.txt"
METADATA_FILE = "metadata.json"
REFERENCE_FILE = "reference.json"
PRODUCTION_FILE = "production"
DECISIONS_DIR = "decisions"
CLAIM_PREFIX = ".claim-"
ALLOCATE_ATTEMPTS = 200
_PERIOD = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_.-]*$")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Metrics(BaseModel):
    """Mean absolute errors on the evaluation slice (seconds for the delivery example)."""

    model_config = ConfigDict(extra="allow")

    mae: float
    mae_mean_baseline: float
    rows_train: int
    rows_eval: int


class NumericReference(BaseModel):
    """A numeric feature's training distribution: a sorted sample that is every non-null value
    when there are few, else the quantiles at (i + 0.5) / k (a k-point quantile sketch)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["numeric"] = "numeric"
    count: int  # non-null training values
    null_rate: float
    mean: float | None
    std: float | None
    sample: list[float]  # sorted


class CategoricalReference(BaseModel):
    """A categorical feature's training distribution: share of each value among non-null rows
    (the most frequent ones; the rest summed under OTHER)."""

    model_config = ConfigDict(extra="forbid")

    OTHER: ClassVar[str] = "__other__"
    kind: Literal["categorical"] = "categorical"
    count: int
    null_rate: float
    frequencies: dict[str, float]


FeatureReference = Annotated[NumericReference | CategoricalReference, Field(discriminator="kind")]


class TrainingReference(BaseModel):
    """What the model saw in training, per input ("view:feature", "request:field") and for its
    predictions on the training rows: the baseline of drift monitoring."""

    model_config = ConfigDict(extra="forbid")

    format: int = 1
    rows: int
    features: dict[str, FeatureReference]
    prediction: NumericReference | None = None


class ModelMetadata(BaseModel):
    """What a served model needs besides its trees: how to build its input vector."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: int = 0  # assigned by ModelRegistry.save
    feature_service: str
    # "view:feature" or "request:field" references, in the model's input order.
    features: list[str]
    label: str
    # Label times (epoch ms) the model was trained and evaluated on: [start, end).
    train_window_ms: tuple[int, int]
    eval_window_ms: tuple[int, int]
    metrics: Metrics
    params: dict[str, Any] = Field(default_factory=dict)
    library_versions: dict[str, str] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    notes: dict[str, Any] = Field(default_factory=dict)
    # Set by models.fit; save() stores it in reference.json, never in metadata.json.
    reference: TrainingReference | None = Field(default=None, exclude=True)


class GateResult(BaseModel):
    """One sanity check of a candidate model in `sluice retrain`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    passed: bool
    detail: str = ""


class CandidateResult(BaseModel):
    """A model compared in `sluice retrain`: its version, its MAE on the held-out labels (None
    when it could not be evaluated: ``note`` says why) and its sanity gates."""

    model_config = ConfigDict(extra="forbid")

    version: int | None
    mae: float | None
    gates: list[GateResult] = Field(default_factory=list)
    note: str = ""


class RetrainDecision(BaseModel):
    """What `sluice retrain` decided for one model and label period, and the numbers behind it."""

    model_config = ConfigDict(extra="forbid")

    model: str
    period: str  # <start>_<end>, compact UTC ISO times: the file's name
    period_ms: tuple[int, int]  # label times [start, end)
    outcome: Literal["promoted", "refused"]
    reason: str
    margin: float  # relative MAE improvement required
    improvement: float | None  # 1 - challenger MAE / champion MAE (None: no champion MAE)
    champion: CandidateResult | None  # None: no production version
    challenger: CandidateResult
    rows_train: int
    rows_eval: int
    eval_window_ms: tuple[int, int]
    warm_start: bool
    decided_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    notes: dict[str, Any] = Field(default_factory=dict)


class ModelRegistry:
    """Save, list, load and promote model versions under one root URI or directory."""

    def __init__(self, root: str, s3: S3Options | None = None) -> None:
        """``root``: a directory, file:// or s3:// URI (core/uris.py resolves it; ``s3``
        defaults to the process's s3_* settings)."""
        try:
            if urlparse(root).scheme in ("", "file", "s3"):
                self._fs, path = filesystem(root, s3, field="models_dir")
            else:  # gs://, hdfs://: pyarrow's own resolution
                self._fs, path = pafs.FileSystem.from_uri(root)
        except StorageError as exc:
            raise ModelRegistryError(str(exc)) from None
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise ModelRegistryError(f"models_dir {root!r}: {exc}") from None
        self.root = root
        self._path = path.rstrip("/")

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelRegistry:
        """The registry at settings.models_dir, with the object store of the same settings."""
        return cls(settings.models_dir, S3Options.from_settings(settings))

    def _p(self, *parts: str | int) -> str:
        return "/".join([self._path, *(str(p) for p in parts)])

    def _write(self, path: str, data: bytes) -> None:
        temporary = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            with self._fs.open_output_stream(temporary) as out:
                out.write(data)
            self._fs.move(temporary, path)  # a rename locally: readers see old or new
        except (OSError, pa.ArrowException) as exc:
            raise ModelRegistryError(f"cannot write {path}: {exc}") from exc

    def _read(self, path: str) -> bytes | None:
        try:
            with self._fs.open_input_stream(path) as stream:
                data: bytes = stream.read()
                return data
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowException) as exc:
            raise ModelRegistryError(f"cannot read {path}: {exc}") from exc

    def _list(self, path: str) -> list[pafs.FileInfo]:
        """The entries of directory ``path``; none when it does not exist.

        FileNotFoundError despite allow_not_found is a race, not an error: pyarrow's local
        filesystem lists the directory, and when that fails checks whether it exists, so a
        directory another trainer creates in between (the first save of a new model name) fails
        the listing with ENOENT (seen in CI). It did not exist when listed: empty."""
        try:
            infos: list[pafs.FileInfo] = self._fs.get_file_info(
                pafs.FileSelector(path, allow_not_found=True)
            )
        except FileNotFoundError:
            return []
        except (OSError, pa.ArrowException) as exc:
            raise ModelRegistryError(f"cannot list {path}: {exc}") from exc
        return infos

    def _children(self, path: str) -> list[str]:
        return [i.base_name for i in self._list(path) if i.type == pafs.FileType.Directory]

    def models(self) -> list[str]:
        return sorted(n for n in self._children(self._path) if _NAME.match(n) and self.versions(n))

    def versions(self, name: str) -> list[int]:
        """Complete versions (metadata written), oldest first."""
        _check_name(name)
        numbers = [int(c) for c in self._children(self._p(name)) if c.isdigit()]
        complete = []
        for number in sorted(numbers):
            info = self._fs.get_file_info(self._p(name, number, METADATA_FILE))
            if info.type == pafs.FileType.File:
                complete.append(number)
        return complete

    def _entries(self, path: str) -> list[str]:
        return [info.base_name for info in self._list(path)]

    def _next_free(self, name: str) -> int:
        """One above the highest version directory holding anything (an empty one is a claim
        given back: free again)."""
        numbers = [int(c) for c in self._children(self._p(name)) if c.isdigit()]
        for number in sorted(numbers, reverse=True):
            if self._entries(self._p(name, number)):
                return number + 1
        return 1

    def _allocate(self, name: str) -> int:
        """A version number that no concurrent trainer gets (the protocol: module docstring)."""
        pause = random.Random()
        for attempt in range(ALLOCATE_ATTEMPTS):
            version = self._next_free(name)
            directory = self._p(name, version)
            claim = f"{CLAIM_PREFIX}{uuid.uuid4().hex}"
            try:
                self._fs.create_dir(directory, recursive=True)
                with self._fs.open_output_stream(f"{directory}/{claim}"):
                    pass
            except (OSError, pa.ArrowException) as exc:
                raise ModelRegistryError(f"cannot claim version {version}: {exc}") from exc
            if self._entries(directory) == [claim]:
                return version
            try:
                self._fs.delete_file(f"{directory}/{claim}")
            except (OSError, pa.ArrowException) as exc:
                raise ModelRegistryError(f"cannot give back version {version}: {exc}") from exc
            time.sleep(pause.uniform(0, 0.002 * min(attempt + 1, 10)))
        raise ModelRegistryError(
            f"model {name!r}: no version allocated after {ALLOCATE_ATTEMPTS} attempts "
            "(too many concurrent trainers)"
        )

    def save(self, model_text: str, metadata: ModelMetadata) -> ModelMetadata:
        """Store a new version of metadata.name (and its reference, when it has one); returns
        the metadata with its version, as ``metadata()`` reads it back."""
        _check_name(metadata.name)
        version = self._allocate(metadata.name)
        # As metadata() reads it back: the reference is stored apart (reference()).
        stored = metadata.model_copy(update={"version": version, "reference": None})
        self._write(self._p(metadata.name, version, MODEL_FILE), model_text.encode())
        if metadata.reference is not None:
            self._write(
                self._p(metadata.name, version, REFERENCE_FILE),
                orjson.dumps(metadata.reference.model_dump(mode="json")),
            )
        # Metadata last: its presence is what makes the version complete.
        self._write(
            self._p(metadata.name, version, METADATA_FILE),
            orjson.dumps(stored.model_dump(mode="json"), option=orjson.OPT_INDENT_2),
        )
        return stored

    def metadata(self, name: str, version: int) -> ModelMetadata:
        _check_name(name)
        data = self._read(self._p(name, version, METADATA_FILE))
        if data is None:
            raise ModelNotFoundError(f"model {name!r} has no version {version}")
        try:
            return ModelMetadata.model_validate(orjson.loads(data))
        except (orjson.JSONDecodeError, ValidationError) as exc:
            raise ModelRegistryError(
                f"model {name!r} version {version}: bad metadata: {exc}"
            ) from None

    def reference(self, name: str, version: int) -> TrainingReference | None:
        """The version's training reference, or None when it was saved without one."""
        _check_name(name)
        data = self._read(self._p(name, version, REFERENCE_FILE))
        if data is None:
            return None
        try:
            return TrainingReference.model_validate(orjson.loads(data))
        except (orjson.JSONDecodeError, ValidationError) as exc:
            raise ModelRegistryError(
                f"model {name!r} version {version}: bad {REFERENCE_FILE}: {exc}"
            ) from None

    def model_text(self, name: str, version: int) -> str:
        _check_name(name)
        data = self._read(self._p(name, version, MODEL_FILE))
        if data is None:
            raise ModelNotFoundError(f"model {name!r} version {version} has no {MODEL_FILE}")
        return data.decode()

    def production(self, name: str) -> int | None:
        """The production version of a model, or None when none was promoted."""
        _check_name(name)
        data = self._read(self._p(name, PRODUCTION_FILE))
        if data is None:
            return None
        text = data.decode().strip()
        if not text.isdigit():
            raise ModelRegistryError(f"model {name!r}: production pointer {text!r} is no version")
        return int(text)

    def promote(self, name: str, version: int) -> int | None:
        """Point production at a version (which must exist); returns the previous production.
        The change joins the rollout history; the version's canary or shadow ends."""
        self.metadata(name, version)
        previous = self.production(name)
        self.set_rollout(name, self.rollout(name).promoted(version, previous))
        self._write(self._p(name, PRODUCTION_FILE), f"{version}\n".encode())
        return previous

    def rollback(self, name: str) -> tuple[int, int]:
        """Production back to the version the current one replaced; every canary and shadow
        ends. Returns (from, to)."""
        current = self.production(name)
        if current is None:
            raise ModelNotFoundError(f"model {name!r} has no production version to roll back")
        state = self.rollout(name)
        target = state.rollback_target(current)
        self.metadata(name, target)
        self.set_rollout(name, state.rolled_back(current, target))
        self._write(self._p(name, PRODUCTION_FILE), f"{target}\n".encode())
        return current, target

    def rollout(self, name: str) -> RolloutState:
        """Canary, shadows and production history of a model (empty when never set)."""
        _check_name(name)
        data = self._read(self._p(name, ROLLOUT_FILE))
        if data is None:
            return RolloutState()
        try:
            return RolloutState.model_validate(orjson.loads(data))
        except (orjson.JSONDecodeError, ValidationError) as exc:
            raise ModelRegistryError(f"model {name!r}: bad {ROLLOUT_FILE}: {exc}") from None

    def set_rollout(self, name: str, state: RolloutState) -> None:
        """Store the rollout state whole; every version it names must exist."""
        _check_name(name)
        for version in {*state.shadows, *([state.canary.version] if state.canary else [])}:
            self.metadata(name, version)
        self._write(
            self._p(name, ROLLOUT_FILE),
            orjson.dumps(state.model_dump(mode="json"), option=orjson.OPT_INDENT_2),
        )

    def record_decision(self, decision: RetrainDecision) -> None:
        """Store a retrain decision (replacing one of the same period: a forced re-run)."""
        _check_name(decision.model)
        _check_period(decision.period)
        try:
            self._fs.create_dir(self._p(decision.model, DECISIONS_DIR), recursive=True)
        except (OSError, pa.ArrowException) as exc:
            raise ModelRegistryError(f"cannot create the decisions log: {exc}") from exc
        self._write(
            self._p(decision.model, DECISIONS_DIR, f"{decision.period}.json"),
            orjson.dumps(decision.model_dump(mode="json"), option=orjson.OPT_INDENT_2),
        )

    def decision(self, name: str, period: str) -> RetrainDecision | None:
        """The recorded decision of a model for one period, or None when it has none."""
        _check_name(name)
        _check_period(period)
        data = self._read(self._p(name, DECISIONS_DIR, f"{period}.json"))
        if data is None:
            return None
        try:
            return RetrainDecision.model_validate(orjson.loads(data))
        except (orjson.JSONDecodeError, ValidationError) as exc:
            raise ModelRegistryError(f"model {name!r}: bad decision {period!r}: {exc}") from None

    def decisions(self, name: str) -> list[RetrainDecision]:
        """Every recorded decision of a model, oldest period first."""
        _check_name(name)
        try:
            infos = self._fs.get_file_info(
                pafs.FileSelector(self._p(name, DECISIONS_DIR), allow_not_found=True)
            )
        except (OSError, pa.ArrowException) as exc:
            raise ModelRegistryError(f"cannot list the decisions of {name!r}: {exc}") from exc
        periods = sorted(
            info.base_name.removesuffix(".json")
            for info in infos
            if info.type == pafs.FileType.File and info.base_name.endswith(".json")
        )
        found = (self.decision(name, p) for p in periods if _PERIOD.match(p))
        return [d for d in found if d is not None]

    def describe(self) -> list[dict[str, Any]]:
        """Every model with its versions, production pointer and metrics (for GET /models)."""
        out = []
        for name in self.models():
            production = self.production(name)
            versions = []
            for version in self.versions(name):
                meta = self.metadata(name, version)
                versions.append(
                    {
                        "version": version,
                        "feature_service": meta.feature_service,
                        "created_at": meta.created_at,
                        "metrics": meta.metrics.model_dump(),
                        "production": version == production,
                    }
                )
            out.append({"name": name, "production": production, "versions": versions})
        return out


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ModelNotFoundError(f"{name!r} is not a model name (lower_snake_case)")


def _check_period(period: str) -> None:
    if not _PERIOD.match(period):
        raise ModelRegistryError(f"{period!r} is not a period name (letters, digits, _ . -)")
