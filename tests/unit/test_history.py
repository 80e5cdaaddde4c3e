"""Parquet event history: typed columns, date partitions, idempotent re-writes."""

from __future__ import annotations

from datetime import UTC, date, datetime
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from events.history import SourceEvent, arrow_schema, read_history, write_history
from examples.delivery.simulate import CityConfig, DeliverySimulator
from examples.delivery.sources import COURIER_PINGS, DELIVERIES, ORDERS, SOURCES
from features.schema import EventSource, Field, FieldType

# 22:00 on the 23rd: the stream below crosses midnight, so two date partitions per source.
START_MS = int(datetime(2026, 11, 23, 22, tzinfo=UTC).timestamp() * 1000)
CITY = CityConfig(n_restaurants=40, n_couriers=30, peak_orders_per_minute=20)


@pytest.fixture(scope="module")
def events() -> list[SourceEvent]:
    return list(islice(DeliverySimulator(seed=4, start_ms=START_MS, city=CITY).events(), 8_000))


def counts(events: list[SourceEvent]) -> dict[str, int]:
    return {s.name: sum(1 for e in events if e.source == s.name) for s in SOURCES}


def day_of(event: SourceEvent) -> date:
    return datetime.fromtimestamp(event.event_time_ms / 1000, tz=UTC).date()


def test_round_trip_keeps_rows_types_and_values(tmp_path, events) -> None:
    written = write_history(events, tmp_path, SOURCES, batch_rows=1_000)
    assert written == counts(events)
    for source in SOURCES:
        table = read_history(tmp_path, source)
        assert table.schema == arrow_schema(source)
        assert table.num_rows == written[source.name]
    orders = read_history(tmp_path, ORDERS)
    assert orders.schema.field("items").type == pa.int64()
    assert orders.schema.field("subtotal").type == pa.float64()
    assert orders.schema.field("placed_at").type == pa.timestamp("ms", tz="UTC")
    assert not orders.schema.field("order_id").nullable
    first = next(e for e in events if e.source == "orders")
    row = orders.slice(0, 1).to_pylist()[0]
    assert row["order_id"] == first.payload["order_id"]
    assert row["placed_at"] == datetime.fromisoformat(first.payload["placed_at"])
    assert int(row["placed_at"].timestamp() * 1000) == first.event_time_ms


def test_partitions_by_utc_date_of_event_time(tmp_path, events) -> None:
    write_history(events, tmp_path, SOURCES, batch_rows=1_000)
    pings = [e for e in events if e.source == "courier_pings"]
    expected_days = sorted({day_of(e) for e in pings})
    assert len(expected_days) == 2  # the fixture must cross midnight to test anything
    partitions = sorted(p.name for p in (tmp_path / "courier_pings").iterdir())
    assert partitions == [f"date={d.isoformat()}" for d in expected_days]
    for day in expected_days:
        directory = tmp_path / "courier_pings" / f"date={day.isoformat()}"
        table = pq.read_table(
            sorted(directory.glob("part-*.parquet")), schema=arrow_schema(COURIER_PINGS)
        )
        assert table.num_rows == sum(1 for e in pings if day_of(e) == day)
        times = table.column("pinged_at").to_pylist()
        assert {t.date() for t in times} == {day}
    # batch_rows bounds the part size.
    assert len(list((tmp_path / "courier_pings").glob("date=*/part-*.parquet"))) > 2


def test_rewriting_a_date_replaces_it_and_leaves_other_dates(tmp_path, events) -> None:
    write_history(events, tmp_path, SOURCES, batch_rows=500)
    before = {s.name: read_history(tmp_path, s).num_rows for s in SOURCES}
    second_day = max(day_of(e) for e in events)
    again = [e for e in events if day_of(e) == second_day]
    write_history(again, tmp_path, SOURCES, batch_rows=10_000)  # fewer, bigger parts this time
    after = {s.name: read_history(tmp_path, s).num_rows for s in SOURCES}
    assert after == before
    parts = list((tmp_path / "courier_pings" / f"date={second_day.isoformat()}").iterdir())
    assert [p.name for p in parts] == ["part-00000.parquet"]
    # Writing only half of that day now leaves only that half: the day is replaced, not merged.
    half = again[: len(again) // 2]
    write_history(half, tmp_path, [COURIER_PINGS])
    first_day_pings = sum(
        1 for e in events if e.source == "courier_pings" and day_of(e) != second_day
    )
    half_pings = sum(1 for e in half if e.source == "courier_pings")
    assert read_history(tmp_path, COURIER_PINGS).num_rows == first_day_pings + half_pings
    assert read_history(tmp_path, ORDERS).num_rows == before["orders"]


def test_only_requested_sources_are_written(tmp_path, events) -> None:
    written = write_history(events, tmp_path, [DELIVERIES])
    assert written == {"deliveries": counts(events)["deliveries"]}
    assert [p.name for p in tmp_path.iterdir()] == ["deliveries"]
    assert read_history(tmp_path, ORDERS).num_rows == 0


def test_nullable_fields_and_epoch_millisecond_timestamps(tmp_path) -> None:
    source = EventSource(
        name="ratings",
        key_field="order_id",
        event_time_field="rated_at",
        fields=(
            Field(name="order_id", type=FieldType.STRING),
            Field(name="stars", type=FieldType.INT, nullable=True),
            Field(name="tipped", type=FieldType.BOOL),
            Field(name="rated_at", type=FieldType.TIMESTAMP),
        ),
    )
    rows = [
        SourceEvent(
            "ratings",
            "o1",
            START_MS,
            {"order_id": "o1", "stars": 5, "tipped": True, "rated_at": START_MS},
        ),
        SourceEvent(
            "ratings",
            "o2",
            START_MS + 1,
            {"order_id": "o2", "stars": None, "tipped": False, "rated_at": START_MS + 1},
        ),
    ]
    assert write_history(rows, tmp_path, [source]) == {"ratings": 2}
    table = read_history(tmp_path, source)
    assert table.schema.field("tipped").type == pa.bool_()
    assert table.column("stars").to_pylist() == [5, None]
    assert [int(t.timestamp() * 1000) for t in table.column("rated_at").to_pylist()] == [
        START_MS,
        START_MS + 1,
    ]


def test_missing_required_value_is_an_error_naming_the_field(tmp_path) -> None:
    broken = SourceEvent("orders", "r1", START_MS, {"order_id": "o1", "restaurant_id": "r1"})
    with pytest.raises(ValueError, match=r"orders\.zone_id"):
        write_history([broken], tmp_path, [ORDERS])


def test_simulator_rewrites_leave_archive_parts_and_both_read_together(tmp_path, events) -> None:
    from events.archive import ArchiveWriter
    from features.validation import EventValidator, ValidEvent

    write_history(events, tmp_path, SOURCES, batch_rows=1_000)
    simulated = read_history(tmp_path, ORDERS).num_rows
    # The archiver adds the same orders from a topic, twice (a replay): read once.
    validator = EventValidator(ORDERS)
    writer = ArchiveWriter(tmp_path, SOURCES, "sluice.dead-letter", fsync=False)
    orders = [e for e in events if e.source == "orders"]
    for offset, event in enumerate(orders + orders):
        valid = validator.validate(event.to_json(), 2**50)
        assert isinstance(valid, ValidEvent)
        writer.add(ORDERS.topic, 0, offset, valid.to_json(), None, 0, 0.0)
    writer.flush_all()
    combined = read_history(tmp_path, ORDERS)
    assert combined.schema == arrow_schema(ORDERS)
    assert combined.num_rows == simulated + len(orders)
    # Re-writing the simulator's history replaces its parts only.
    write_history(events, tmp_path, SOURCES, batch_rows=5_000)
    assert read_history(tmp_path, ORDERS).num_rows == simulated + len(orders)
    names = sorted(p.name for p in (tmp_path / "orders").glob("date=*/part-*.parquet"))
    last = 2 * len(orders) - 1
    assert names == [
        "part-00000.parquet",
        "part-00000.parquet",
        f"part-events.orders.p0.o000000000000-{last:012d}.g1of2.parquet",
        f"part-events.orders.p0.o000000000000-{last:012d}.g2of2.parquet",
    ]
