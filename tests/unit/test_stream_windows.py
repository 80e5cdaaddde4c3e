"""The stream engine's per-key window state against the reference, without a JVM.

A small model of Flink's event-time timer service drives streaming.windows exactly as the
KeyedProcessFunction does, including what PyFlink really does (seen in the job): timers that
fire in rounds, a timer registered in a firing that is already due fires in a later round,
the same timestamp may fire twice, and a watermark that jumps fires far ends before near ones.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction
from typing import Any

import pytest

from examples.delivery.features import restaurant_orders, restaurant_prep
from examples.delivery.simulate import DeliverySimulator
from examples.delivery.sources import ORDERS
from features.definitions import Aggregation, AggregationFunction, FeatureView, Window
from features.reference import compute_view, prepare, with_closing_rows
from features.schema import EventSource
from features.validation import EventValidator, ValidEvent
from streaming.compile import check_event_engine, compile_view
from streaming.errors import UnsupportedViewError
from tests.helpers.stream import MAX_WM, MIN_WM, STREAM_VIEWS, TimerModel, row_differences

START = 1_767_225_600_000  # 2026-01-01T00:00Z, a whole day


def arrival_order(
    events: list[dict[str, Any]], rng: random.Random, time_field: str
) -> list[dict[str, Any]]:
    """Time order, with some events a little late, some very late, some on slide boundaries,
    and some delivered twice (ingest is at least once): right away or a little later."""
    out = []
    for event in events:
        r = rng.random()
        if r < 0.05:
            event = event | {time_field: event[time_field] - rng.randrange(1, 90_000)}
        elif r < 0.07:
            event = event | {time_field: event[time_field] - rng.randrange(600_000, 3_600_000)}
        elif r < 0.10:
            event = event | {time_field: event[time_field] - event[time_field] % 60_000}
        out.append(event)
        if rng.random() < 0.04:
            out.insert(len(out) - rng.randrange(min(len(out), 20)), dict(event))
    return out


def simulated(n: int, source: EventSource, seed: int) -> list[dict[str, Any]]:
    """Canonical events (as the ingest path forwards them: event time in epoch ms)."""
    validator = EventValidator(source)
    sim = DeliverySimulator(seed=seed, start_ms=START)
    out = []
    for event in sim.events():
        if event.source == source.name:
            valid = validator.validate_object(event.payload, now_ms=START + 365 * 86_400_000)
            assert isinstance(valid, ValidEvent)
            out.append(valid.values)
            if len(out) == n:
                return out
    raise AssertionError("unreachable: the simulator never ends")


@pytest.mark.parametrize("view", STREAM_VIEWS, ids=lambda v: v.name)
@pytest.mark.parametrize("seed", [1, 2])
def test_rows_equal_reference_over_counted_events(view: FeatureView, seed: int):
    rng = random.Random(seed)
    model = TimerModel(view, rng)
    time_field = view.source.event_time_field
    lateness = int(view.source.allowed_lateness.total_seconds() * 1000)
    newest = MIN_WM
    for event in arrival_order(simulated(2500, view.source, seed), rng, time_field):
        if rng.random() < 0.3:  # periodic watermark emission, at random moments
            model.advance(newest - lateness)
        model.process(event)
        newest = max(newest, event[time_field])
    model.advance(MAX_WM)

    assert model.late, "the arrival order should make some events too late"
    assert model.duplicates, "the arrival order should repeat some events"
    assert not model.states, "every key's state is released after its closing row"
    assert len(set(model.aggregated)) == len(model.aggregated), "no event is counted twice"
    want = with_closing_rows(view, compute_view(view, model.counted))
    assert row_differences(model.rows, want) == []


def test_late_means_smallest_window_already_emitted():
    model = TimerModel(restaurant_orders, random.Random(0))
    base = START + 10 * 60_000

    def order(t: int) -> dict[str, Any]:
        return {"restaurant_id": "r1", "items": 1, "subtotal": 1.0, "placed_at": t}

    for t in (base, base + 61_000):
        model.process(order(t))
    model.advance(base + 60_000)  # the row ending at base + 1m is out
    for t in (base + 59_999, base + 60_000, base + 1):
        model.process(order(t))
    assert [e["placed_at"] for e in model.late] == [base + 59_999, base + 1]
    assert model.rows[("r1", base + 60_000)]["count_5m"] == 1
    model.advance(MAX_WM)
    assert model.rows[("r1", base + 120_000)]["count_5m"] == 3


def test_stddev_over_tiles_is_exact_for_a_large_mean_and_small_spread():
    """Windows merge per-tile (count, mean, M2) states; with means near 1e9 and a spread of
    about 0.01, a mean held as one float (ulp 1.2e-7) would lose the digits that matter."""
    window = Window.sliding("10m", every="1m")
    view = FeatureView(
        name="big_offsets",
        entity=restaurant_orders.entity,
        source=ORDERS,
        derived={"shifted": "subtotal * 0.0001 + 1000000000.0"},
        aggregations=(
            Aggregation(function=AggregationFunction.STDDEV, column="shifted", windows=(window,)),
            Aggregation(function=AggregationFunction.MEAN, column="shifted", windows=(window,)),
        ),
    )
    rng = random.Random(5)
    model = TimerModel(view, rng)
    events = [
        {"restaurant_id": "r1", "items": 1, "subtotal": rng.uniform(0, 100), "placed_at": t}
        for t in sorted(START + rng.randrange(30 * 60_000) for _ in range(400))
    ]
    for event in events:
        model.process(event)
    model.advance(MAX_WM)
    values = [(row["placed_at"], row["shifted"]) for row in prepare(view, events)]
    checked = 0
    for (_, end), row in model.rows.items():
        inside = [Fraction(v) for t, v in values if end - window.size_ms <= t < end]
        if len(inside) < 2:
            continue
        mean = sum(inside) / len(inside)
        exact = math.sqrt(sum((v - mean) ** 2 for v in inside) / (len(inside) - 1))
        assert math.isclose(row["stddev_shifted_10m"], exact, rel_tol=1e-9), end
        assert math.isclose(row["mean_shifted_10m"], float(mean), rel_tol=1e-15), end
        checked += 1
    assert checked > 30


def test_views_the_engine_cannot_run_fail_at_compile_time():
    with pytest.raises(UnsupportedViewError, match=r"restaurant_prep.*not on Flink"):
        compile_view(restaurant_prep)
    tiny_slide = restaurant_orders.model_copy(
        update={
            "aggregations": (
                Aggregation(
                    function=AggregationFunction.COUNT, windows=(Window.sliding("2h", "1s"),)
                ),
            )
        }
    )
    # The tile engine keeps up to 43,200 slides (30 days of minutes); the per-event one 4,096.
    with pytest.raises(UnsupportedViewError, match=r"7200 slides per window.*tile engine"):
        check_event_engine(compile_view(tiny_slide))


def test_job_configuration_local_remote_and_restore(tmp_path):
    from streaming.errors import StreamJobError
    from streaming.job import JobOptions, flink_configuration

    local = flink_configuration(tmp_path, "job", JobOptions(), bounded=False, restore_from=None)
    assert "execution.target" not in local  # a local mini-cluster
    assert local["execution.checkpointing.interval"] == "10000 ms"
    assert local["execution.checkpointing.externalized-checkpoint-retention"] == (
        "RETAIN_ON_CANCELLATION"
    )
    assert local["execution.checkpointing.dir"] == (tmp_path / "checkpoints").resolve().as_uri()
    assert "execution.state-recovery.path" not in local

    remote = flink_configuration(
        tmp_path,
        "job",
        JobOptions(jobmanager="flink.internal:8081"),
        bounded=True,
        restore_from=tmp_path / "savepoints" / "sp-1",
    )
    assert (remote["execution.target"], remote["rest.address"], remote["rest.port"]) == (
        "remote",
        "flink.internal",
        "8081",
    )
    assert remote["execution.checkpointing.externalized-checkpoint-retention"] == (
        "DELETE_ON_CANCELLATION"
    )
    assert remote["execution.state-recovery.path"].endswith("/savepoints/sp-1")
    with pytest.raises(StreamJobError, match="not host:port"):
        flink_configuration(
            tmp_path, "job", JobOptions(jobmanager="nohost"), bounded=False, restore_from=None
        )


def test_jobmanager_setting_names_the_field():
    from core.errors import SettingsError
    from core.settings import load_settings

    with pytest.raises(SettingsError, match="flink_jobmanager"):
        load_settings(flink_jobmanager="just-a-host")
