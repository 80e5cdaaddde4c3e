"""Bundle ends of Python functions in either PyFlink mode (streaming/functions.on_bundle_end,
streaming/bundle_ends.py): a gauge in process mode, the operator's registry in thread mode,
and an error for a thread-mode function outside sluice's operators (it would never flush)."""

from __future__ import annotations

from typing import Any

import pytest

from streaming import bundle_ends
from streaming.errors import StreamJobError
from streaming.functions import on_bundle_end


class Metrics:
    def __init__(self) -> None:
        self.gauges: dict[str, Any] = {}

    def gauge(self, name: str, callback: Any) -> None:
        self.gauges[name] = callback


class ProcessContext:
    """The shape of process mode's runtime context: no token among its job parameters."""

    def __init__(self, parameters: dict[str, str] | None = None) -> None:
        self.parameters = parameters or {}
        self.metrics = Metrics()

    def get_job_parameter(self, key: str, default: str | None) -> str | None:
        return self.parameters.get(key, default)

    def get_metrics_group(self) -> Metrics:
        return self.metrics


# PyFlink's thread-mode runtime context lives in pyflink.fn_execution.datastream.embedded.
EmbeddedContext = type(
    "StreamingRuntimeContext",
    (ProcessContext,),
    {"__module__": "pyflink.fn_execution.datastream.embedded.runtime_context"},
)


def recorder(calls: list[str]) -> Any:
    def flush() -> int:
        calls.append("flushed")
        return len(calls)

    return flush


def test_process_mode_flushes_through_a_gauge() -> None:
    context = ProcessContext()
    calls: list[str] = []
    on_bundle_end(context, "flush", recorder(calls))
    assert list(context.metrics.gauges) == ["flush"]
    context.metrics.gauges["flush"]()
    assert calls == ["flushed"]


def test_thread_mode_flushes_when_its_operator_ends_a_bundle() -> None:
    token = "op-1"
    calls: list[str] = []
    context = EmbeddedContext({bundle_ends.TOKEN: token})
    on_bundle_end(context, "flush", recorder(calls))
    try:
        assert context.metrics.gauges == {}, "no gauge: nothing would read it before a barrier"
        bundle_ends.end_bundle(token)
        bundle_ends.end_bundle("another operator")  # registered nothing: nothing to do
        assert calls == ["flushed"]
        with pytest.raises(StreamJobError, match="registered twice"):
            bundle_ends.register(token, lambda: 0)
    finally:
        bundle_ends.forget_bundle(token)
    bundle_ends.end_bundle(token)  # closed: forgotten
    assert calls == ["flushed"]


def test_a_flush_that_fails_fails_the_bundle() -> None:
    def broken() -> int:
        raise OSError("redis is down")

    bundle_ends.register("op-2", broken)
    try:
        with pytest.raises(OSError, match="redis is down"):
            bundle_ends.end_bundle("op-2")
    finally:
        bundle_ends.forget_bundle("op-2")


def test_thread_mode_outside_sluices_operators_is_refused() -> None:
    with pytest.raises(StreamJobError, match="thread mode outside sluice's operators"):
        on_bundle_end(EmbeddedContext(), "sluice_tiles_flush", lambda: 0)
