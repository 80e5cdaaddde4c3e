"""Typed, versioned records of the monitoring topic (settings.monitoring_topic).

record         written by                 what
MonitorRecord  monitoring/monitor.py      one check's result for one period and subject
AlertRecord    monitoring/monitor.py      a result whose band reached the alert band

Both share the topic; the JSON field ``"record"`` says which (``decode_monitoring``). Keys are
``MonitorRecord.key`` / ``AlertRecord.key``: the same check, subject and period always has the
same key, so a period re-emitted after a restart replaces the earlier record in a compacted
topic and readers can de-duplicate by key.

Versions work as in core/records.py: every record carries ``"v"``; a reader takes versions up
to its own and refuses newer ones by name; bump VERSION when an old reader would misread a
new record (an added optional field does not need one). ``decode`` checks every field and
raises core.errors.RecordError naming the field and the reason.

Checks (``check``) and their subjects:

- ``drift``: model, model_version, feature ("view:feature" or "request:field")
- ``prediction_drift``: model, model_version
- ``serving``: model (latency percentiles, batch sizes, throughput, traffic share by version)
- ``freshness``: view (ages of the served windows against the availability contract)
- ``stream_freshness``: view (rows on features.<view>: emitted after their servable time?)
- ``live_error``: model, model_version (MAE from feedback against the training MAE)
- ``skew``: model, model_version (online values against the offline recomputation)
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import RecordError

Band = Literal["none", "possible", "drift", "unknown"]
BANDS: tuple[Band, ...] = ("unknown", "none", "possible", "drift")  # in rising order
Scalar = float | int | str | bool | None
CHECKS = (
    "drift",
    "prediction_drift",
    "serving",
    "freshness",
    "stream_freshness",
    "live_error",
    "skew",
)


def band_rank(band: Band | None) -> int:
    """unknown/None 0, none 1, possible 2, drift 3: compare bands."""
    return BANDS.index(band) if band is not None else 0


def worst(*bands: Band) -> Band:
    """The highest of some bands ("unknown" when none is given)."""
    return max(bands, key=band_rank, default="unknown")


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    KIND: ClassVar[str] = "monitoring"
    VERSION: ClassVar[int] = 1

    check: str
    period_start_ms: int
    period_end_ms: int
    model: str | None = None
    model_version: int | None = None
    view: str | None = None
    feature: str | None = None
    at_ms: int
    v: int = 1

    @property
    def key(self) -> str:
        parts = (self.check, self.model, self.model_version, self.view, self.feature)
        subject = "/".join("" if p is None else str(p) for p in parts)
        return f"{subject}@{self.period_start_ms}"

    def encode(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def _decode_object(cls, obj: dict[str, Any]) -> Any:
        version = obj.get("v", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise RecordError(cls.KIND, "v", f"expected a version number >= 1, got {version!r}")
        if version > cls.VERSION:
            raise RecordError(
                cls.KIND, "v", f"version {version} is newer than this Sluice reads ({cls.VERSION})"
            )
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(p) for p in error["loc"]) or None
            raise RecordError(cls.KIND, field, error["msg"]) from None


class MonitorRecord(_Record):
    """The result of one check for one period and subject (see the module doc)."""

    KIND: ClassVar[str] = "monitor"
    VERSION: ClassVar[int] = 1

    record: Literal["monitor"] = "monitor"
    rows: int = 0  # records the result is computed from
    band: Band | None = None  # None: the check has no bands (serving, stream_freshness)
    values: dict[str, Scalar] = Field(default_factory=dict)  # statistics by name
    items: list[str] = Field(default_factory=list)  # e.g. skewed "view:entity" keys

    @classmethod
    def decode(cls, data: bytes | None) -> MonitorRecord:
        record = decode_monitoring(data)
        if not isinstance(record, MonitorRecord):
            raise RecordError(cls.KIND, "record", "expected a monitor record, got an alert")
        return record


class AlertRecord(_Record):
    """A result that reached the alert band: what crossed which threshold, in words too."""

    KIND: ClassVar[str] = "alert"
    VERSION: ClassVar[int] = 1

    record: Literal["alert"] = "alert"
    band: Band
    metric: str  # the statistic that decided the band (psi, mismatch_rate, mae_ratio, ...)
    value: float | None
    threshold: float  # the value at which the band starts
    message: str

    @classmethod
    def decode(cls, data: bytes | None) -> AlertRecord:
        record = decode_monitoring(data)
        if not isinstance(record, AlertRecord):
            raise RecordError(cls.KIND, "record", "expected an alert, got a monitor record")
        return record


def decode_monitoring(data: bytes | None) -> MonitorRecord | AlertRecord:
    """A record of the monitoring topic, whichever of the two it is."""
    kind = "monitoring"
    if data is None:
        raise RecordError(kind, None, "the record has no value")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise RecordError(kind, None, f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise RecordError(kind, None, "expected a JSON object")
    which = obj.get("record")
    if which == "monitor":
        decoded: MonitorRecord | AlertRecord = MonitorRecord._decode_object(obj)
    elif which == "alert":
        decoded = AlertRecord._decode_object(obj)
    else:
        raise RecordError(kind, "record", f"expected 'monitor' or 'alert', got {which!r}")
    return decoded
