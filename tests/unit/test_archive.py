"""The archiver's Kafka-free core: event identity, part names, offsets recovered from the parts
after any kill, late marks, and read_history's de-duplication and late exclusion."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.records import HEARTBEAT_HEADERS, HEARTBEAT_VALUE, DeadLetter
from events.archive import ArchiveWriter, archive_lock
from events.errors import ArchiveLayoutError, ArchiveLockedError
from events.history import (
    EVENT_ID,
    OFFSET,
    PARTITION,
    TOPIC,
    PartName,
    archive_schema,
    arrow_schema,
    first_per_event,
    late_dir,
    parse_events,
    parse_part_name,
    part_metadata,
    read_history,
    read_late_marks,
    recover,
)
from events.identity import event_id
from examples.delivery.simulate import CityConfig, DeliverySimulator
from examples.delivery.sources import COURIER_PINGS, ORDERS, SOURCES
from features.validation import EventValidator, ValidEvent

DLT = "sluice.dead-letter"
# 23:00 UTC: the events cross midnight, so a partition's flush writes two days.
START_MS = int(datetime(2026, 11, 23, 23, tzinfo=UTC).timestamp() * 1000)
CITY = CityConfig(n_restaurants=30, n_couriers=20, peak_orders_per_minute=20)
NOW = 2**50  # "now" for validation: nothing is in the future


def canonical_events(n: int, seed: int = 3) -> list[tuple[str, bytes]]:
    """(topic, canonical value) of n simulated events, as ingest writes them."""
    validators = {s.name: EventValidator(s) for s in SOURCES}
    topics = {s.name: s.topic for s in SOURCES}
    out = []
    for event in islice(DeliverySimulator(seed=seed, start_ms=START_MS, city=CITY).events(), n):
        valid = validators[event.source].validate(event.to_json(), NOW)
        assert isinstance(valid, ValidEvent)
        out.append((topics[event.source], valid.to_json()))
    return out


def writer(root: Path, **options: object) -> ArchiveWriter:
    return ArchiveWriter(root, SOURCES, DLT, fsync=False, **options)  # type: ignore[arg-type]


def archived_offsets(root: Path, source_name: str) -> Counter[tuple[int, int]]:
    """(partition, offset) -> how many rows of the source's archive parts hold it."""
    found: Counter[tuple[int, int]] = Counter()
    for path in (root / source_name).glob("date=*/part-*.parquet"):
        table = pq.read_table(path, columns=[PARTITION, OFFSET])
        found.update(zip(*(table.column(c).to_pylist() for c in (PARTITION, OFFSET)), strict=True))
    return found


# -- identity -----------------------------------------------------------------------------------


def test_the_same_event_validated_twice_has_the_same_id_and_others_differ() -> None:
    validator = EventValidator(ORDERS)
    raw = (
        b'{"zone_id": "z01", "order_id": "o1", "restaurant_id": "r1", "items": 2, '
        b'"subtotal": 20.5, "distance_km": 3.0, "placed_at": "2026-11-23T12:00:00.000Z", '
        b'"extra": 1}'
    )
    first, again = validator.validate(raw, NOW), validator.validate(raw, NOW)
    assert isinstance(first, ValidEvent)
    assert isinstance(again, ValidEvent)
    assert event_id(first.to_json()) == event_id(again.to_json())
    # Field order, spacing and unknown fields of the raw record do not matter: canonical bytes.
    reordered = validator.validate(raw.replace(b'"extra": 1', b'"extra": 2').replace(b" ", b""))
    assert isinstance(reordered, ValidEvent)
    assert event_id(reordered.to_json()) == event_id(first.to_json())
    ids = {event_id(value) for _, value in canonical_events(2_000)}
    assert len(ids) == 2_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


# -- part names ---------------------------------------------------------------------------------


def test_part_names_round_trip_and_other_files_are_not_parts() -> None:
    part = PartName("events.courier_pings-v2", 3, 1_200, 1_299, 2, 3)
    name = part.file_name()
    assert name == "part-events.courier_pings-v2.p3.o000000001200-000000001299.g2of3.parquet"
    assert parse_part_name(name) == part
    assert part.flush == ("events.courier_pings-v2", 3, 1_200, 1_299, 3)
    big = PartName("t", 0, 10**13, 10**13 + 5, 1, 1)
    assert parse_part_name(big.file_name()) == big
    for other in ("part-00000.parquet", f".{name}.tmp", "part-t.p1.o1-2.parquet", "x.parquet"):
        assert parse_part_name(other) is None


def test_parts_carry_their_offsets_in_the_name_and_the_metadata(tmp_path: Path) -> None:
    w = writer(tmp_path, flush_records=10**6)
    events = [(t, v) for t, v in canonical_events(3_000) if t == ORDERS.topic]
    for offset, (topic, value) in enumerate(events):
        w.add(topic, 0, 100 + offset, value, None, 7, 0.0)
    w.flush_all()
    parts = sorted((tmp_path / "orders").glob("date=*/part-*.parquet"))
    assert [p.parent.name for p in parts] == ["date=2026-11-23", "date=2026-11-24"]
    names = [parse_part_name(p.name) for p in parts]
    last = 100 + len(events) - 1
    assert names == [PartName(ORDERS.topic, 0, 100, last, i, 2) for i in (1, 2)]
    for path, name in zip(parts, names, strict=True):
        assert name is not None
        table = pq.read_table(path)
        assert part_metadata(path) == {
            "topic": ORDERS.topic,
            "partition": 0,
            "first_offset": 100,
            "last_offset": last,
            "part": name.index,
            "parts": 2,
            "records": table.num_rows,
        }
        assert table.schema.remove_metadata() == archive_schema(ORDERS)
        day = path.parent.name.removeprefix("date=")
        assert {t.date().isoformat() for t in table.column("placed_at").to_pylist()} == {day}
    assert w.counts.archived == len(events) == w.counts.consumed
    assert w.counts.balanced()
    assert recover(tmp_path).next_offsets == {(ORDERS.topic, 0): last + 1}
    table = read_history(tmp_path, ORDERS)
    assert table.schema == arrow_schema(ORDERS)
    assert table.num_rows == len(events)


# -- exactly once across kills ------------------------------------------------------------------


def test_recovery_undoes_incomplete_flushes_and_temp_files(tmp_path: Path) -> None:
    w = writer(tmp_path, flush_records=500)
    pings = [v for t, v in canonical_events(6_000) if t == COURIER_PINGS.topic]
    for offset, value in enumerate(pings[:1_000]):
        w.add(COURIER_PINGS.topic, 1, offset, value, None, 0, 0.0)
    w.flush_all()
    complete = recover(tmp_path)
    assert complete.next_offsets == {(COURIER_PINGS.topic, 1): 1_000}
    # A kill between the two renames of a flush across midnight, and one during a write.
    day1, day2 = (tmp_path / "courier_pings" / f"date=2026-11-{d}" for d in (23, 24))
    day2.mkdir(parents=True, exist_ok=True)
    half = PartName(COURIER_PINGS.topic, 1, 1_000, 1_499, 1, 2)
    pq.write_table(archive_schema(COURIER_PINGS).empty_table(), day1 / half.file_name())
    temp = day2 / f".{PartName(COURIER_PINGS.topic, 1, 1_000, 1_499, 2, 2).file_name()}.tmp"
    temp.write_bytes(b"half a parquet file")
    unrelated = day1 / ".notes.tmp"
    unrelated.write_text("not ours")
    recovered = recover(tmp_path)
    assert recovered.next_offsets == complete.next_offsets
    assert sorted(recovered.undone) == sorted([day1 / half.file_name(), temp])
    assert not temp.exists()
    assert not (day1 / half.file_name()).exists()
    assert unrelated.exists()
    assert recovered.parts == complete.parts


def test_a_missing_part_of_an_older_flush_is_a_layout_error(tmp_path: Path) -> None:
    directory = tmp_path / "orders" / "date=2026-11-23"
    directory.mkdir(parents=True)
    for part in (PartName(ORDERS.topic, 0, 0, 99, 1, 2), PartName(ORDERS.topic, 0, 100, 199, 1, 1)):
        pq.write_table(archive_schema(ORDERS).empty_table(), directory / part.file_name())
    with pytest.raises(ArchiveLayoutError, match="is missing but later flushes exist"):
        recover(tmp_path)
    assert len(list(directory.iterdir())) == 2  # nothing deleted


def test_overlapping_flushes_are_a_layout_error(tmp_path: Path) -> None:
    directory = tmp_path / "orders" / "date=2026-11-23"
    directory.mkdir(parents=True)
    for first, last in ((0, 99), (50, 149)):
        name = PartName(ORDERS.topic, 0, first, last, 1, 1).file_name()
        pq.write_table(archive_schema(ORDERS).empty_table(), directory / name)
    with pytest.raises(ArchiveLayoutError, match=r"offsets 50\.\.99 are archived twice"):
        recover(tmp_path)


@pytest.mark.parametrize("seed", range(6))
def test_every_offset_is_archived_exactly_once_whatever_moment_a_kill_comes(
    tmp_path: Path, seed: int
) -> None:
    """Simulated kills: at a random record (buffers lost), sometimes between two renames of a
    flush or during a write. Each restart resumes from recover() only."""
    rng = random.Random(seed)
    events = canonical_events(5_000, seed=seed)
    log = {  # the topics: (topic, partition) -> values by offset
        (topic, p): [v for i, (t, v) in enumerate(events) if t == topic and i % 2 == p]
        for topic in {t for t, _ in events}
        for p in (0, 1)
    }
    total = sum(len(values) for values in log.values())
    for _run in range(8):
        w = writer(tmp_path, flush_records=rng.choice([50, 300, 1_000]))
        resume = recover(tmp_path).next_offsets
        cursors = {key: resume.get(key, 0) for key in log}
        stop = rng.randrange(total // 6)
        for _ in range(stop):
            key = rng.choice([k for k in log if cursors[k] < len(log[k])] or [None])
            if key is None:
                break
            w.add(key[0], key[1], cursors[key], log[key][cursors[key]], None, 0, 0.0)
            cursors[key] += 1
        if rng.random() < 0.5:  # the kill lands in the middle of a flush: undo one part
            parts = sorted(
                tmp_path.glob("*/date=*/part-*.parquet"), key=lambda p: p.stat().st_mtime
            )
            if parts:
                newest = parts[-1]
                newest.rename(newest.with_name(f".{newest.name}.tmp"))
        # kill -9: the pending buffers vanish with the writer
    final = writer(tmp_path, flush_records=1_000)
    resume = recover(tmp_path).next_offsets
    for key, values in log.items():
        for offset in range(resume.get(key, 0), len(values)):
            final.add(key[0], key[1], offset, values[offset], None, 0, 0.0)
    final.flush_all()
    for source in SOURCES:
        found = archived_offsets(tmp_path, source.name)
        expected = {
            (p, o) for (t, p), vs in log.items() if t == source.topic for o in range(len(vs))
        }
        assert set(found) == expected
        assert set(found.values()) == {1}, "an offset archived twice"
    assert recover(tmp_path).next_offsets == {key: len(values) for key, values in log.items()}


# -- late marks and dead letters ----------------------------------------------------------------


def dead_letter(reason: str, offset: int, view: str | None = "restaurant_orders") -> DeadLetter:
    return DeadLetter(
        reason=reason,
        field=None,
        error="too late" if reason == "late" else "bad",
        source="orders",
        source_topic=ORDERS.topic,
        partition=0,
        offset=offset,
        view=view if reason == "late" else None,
    )


def test_late_dead_letters_become_marks_and_read_history_leaves_them_out(tmp_path: Path) -> None:
    w = writer(tmp_path)
    orders = [v for t, v in canonical_events(3_000) if t == ORDERS.topic][:200]
    for offset, value in enumerate(orders):
        w.add(ORDERS.topic, 0, offset, value, None, 0, 0.0)
    # The stream dead-letters offsets 5 and 9 as late for restaurant_orders, 9 for another
    # view too; ingest dead-letters an invalid record; one dead letter has broken headers.
    letters = [
        (orders[5], dead_letter("late", 5)),
        (orders[9], dead_letter("late", 9)),
        (orders[9], dead_letter("late", 9, view="zone_orders")),
        (b"{", dead_letter("invalid_json", 0)),
    ]
    for offset, (value, letter) in enumerate(letters):
        w.add(DLT, 2, offset, value, letter.to_headers(), 0, 0.0)
    w.add(DLT, 2, len(letters), b"x", [("sluice.reason", b"late")], 0, 0.0)
    w.flush_all()
    counts = w.counts
    assert (counts.consumed, counts.archived, counts.late_marks, counts.skipped) == (205, 200, 3, 2)
    assert counts.skipped_by_reason == {"invalid_json": 1, "unreadable_dead_letter": 1}
    assert counts.balanced()
    [marks_part] = late_dir(tmp_path, "orders").glob("part-*.parquet")
    assert parse_part_name(marks_part.name) == PartName(DLT, 2, 0, 4, 1, 1)
    marks = read_late_marks(tmp_path, "orders", "restaurant_orders")
    assert marks.column("offset").to_pylist() == [5, 9]
    assert marks.column("event_id").to_pylist() == [event_id(orders[5]), event_id(orders[9])]
    everything = read_history(tmp_path, ORDERS)
    assert everything.num_rows == 200
    for view, left_out in (("restaurant_orders", {5, 9}), ("zone_orders", {9}), ("other", set())):
        table = read_history(tmp_path, ORDERS, view=view)
        kept = [i for i in range(200) if i not in left_out]
        assert table.column("order_id").to_pylist() == [
            everything.column("order_id")[i].as_py() for i in kept
        ]
    assert recover(tmp_path).next_offsets == {(ORDERS.topic, 0): 200, (DLT, 2): 5}


def test_a_flush_of_skipped_records_only_leaves_one_progress_part(tmp_path: Path) -> None:
    w = writer(tmp_path, flush_records=3)
    for offset in range(9):
        w.add(DLT, 0, offset, b"{", dead_letter("wrong_type", offset).to_headers(), 0, 0.0)
    progress = list((tmp_path / "_archive" / "progress").glob("part-*.parquet"))
    assert [parse_part_name(p.name) for p in progress] == [PartName(DLT, 0, 6, 8, 1, 1)]
    assert recover(tmp_path).next_offsets == {(DLT, 0): 9}
    assert w.counts.skipped == 9
    assert w.counts.balanced()


# -- reading: duplicates, mixed parts, values that are not canonical ----------------------------


def test_read_history_keeps_a_replayed_event_once_at_its_first_offset(tmp_path: Path) -> None:
    orders = [v for t, v in canonical_events(2_000) if t == ORDERS.topic][:100]
    w = writer(tmp_path, flush_records=40)
    # Ingest crashed after writing 0..29 and replayed them: offsets 100..129 repeat them, and
    # partition 1 holds another copy of event 3 (published twice by hand).
    for offset, value in enumerate(orders + orders[:30]):
        w.add(ORDERS.topic, 0, offset, value, None, 0, 0.0)
    w.add(ORDERS.topic, 1, 0, orders[3], None, 0, 0.0)
    w.flush_all()
    assert w.counts.archived == 131
    table = read_history(tmp_path, ORDERS)
    assert table.schema == arrow_schema(ORDERS)
    assert table.num_rows == 100
    assert sorted(table.column("order_id").to_pylist()) == sorted(
        orjson.loads(v)["order_id"] for v in orders
    )
    # The copy kept is the first by (topic, partition, offset), whatever order the rows had.
    wide = pa.concat_tables(
        pq.read_table(p) for p in (tmp_path / "orders").glob("date=*/part-*.parquet")
    )
    shuffled = wide.take(random.Random(1).sample(range(wide.num_rows), wide.num_rows))
    kept = first_per_event(shuffled)
    assert kept.num_rows == 100
    assert sorted(kept.column(OFFSET).to_pylist()) == list(range(100))
    assert set(kept.column(PARTITION).to_pylist()) == {0}
    assert set(kept.column(TOPIC).to_pylist()) == {ORDERS.topic}
    assert len(set(kept.column(EVENT_ID).to_pylist())) == 100
    # Rows keep the order they had: first_per_event only drops.
    positions = {o: i for i, o in enumerate(shuffled.column(OFFSET).to_pylist())}
    offsets = kept.column(OFFSET).to_pylist()
    assert offsets == sorted(offsets, key=lambda o: positions[o])


def test_values_that_are_not_canonical_are_skipped_and_counted(tmp_path: Path) -> None:
    orders = [v for t, v in canonical_events(2_000) if t == ORDERS.topic][:50]
    broken = list(orders)
    broken[7] = b"not json"
    broken[20] = orders[20].replace(b'"items":', b'"items":"many","x":')  # wrong type
    broken[33] = b'{"order_id": "o-only"}'  # required fields missing
    table, kept = parse_events(ORDERS, broken)
    assert kept == [i for i in range(50) if i not in (7, 20, 33)]
    assert table.num_rows == 47
    w = writer(tmp_path)
    for offset, value in enumerate(broken):
        w.add(ORDERS.topic, 0, offset, value, None, 0, 0.0)
    w.add(ORDERS.topic, 0, 50, None, None, 0, 0.0)  # a tombstone
    w.flush_all()
    assert w.counts.skipped_by_reason == {"not_canonical": 3, "no_value": 1}
    assert (w.counts.archived, w.counts.skipped) == (47, 4)
    assert w.counts.balanced()
    assert recover(tmp_path).next_offsets == {(ORDERS.topic, 0): 51}


def test_ingest_heartbeats_are_skipped_as_heartbeats_not_parsed(tmp_path: Path) -> None:
    orders = [v for t, v in canonical_events(2_000) if t == ORDERS.topic][:10]
    w = writer(tmp_path)
    for offset, value in enumerate(orders):
        w.add(ORDERS.topic, 0, offset, value, None, 0, 0.0)
        w.add(ORDERS.topic, 0, 100 + offset, HEARTBEAT_VALUE, HEARTBEAT_HEADERS, 0, 0.0)
    w.flush_all()
    assert w.counts.skipped_by_reason == {"heartbeat": 10}
    assert (w.counts.archived, w.counts.consumed) == (10, 20)
    assert w.counts.balanced()


def test_flushes_are_due_after_flush_seconds(tmp_path: Path) -> None:
    w = writer(tmp_path, flush_seconds=5.0)
    value = next(v for t, v in canonical_events(200) if t == ORDERS.topic)
    w.add(ORDERS.topic, 0, 0, value, None, 0, now=100.0)
    w.flush_due(104.9)
    assert w.counts.archived == 0
    assert w.counts.buffered == 1
    w.flush_due(105.0)
    assert w.counts.archived == 1
    assert not w.pending


def test_one_archiver_per_history_directory(tmp_path: Path) -> None:
    with (
        archive_lock(tmp_path),
        pytest.raises(ArchiveLockedError, match="another"),
        archive_lock(tmp_path),
    ):
        pass
    with archive_lock(tmp_path):  # released
        pass
