"""Windows are servable on time, live, through ingest and the stream: a window ending at E must
be readable in Redis by its servable time E + view.lateness + 1 s (p99), also when keys,
partitions or the whole topic go quiet; and an event delivered twice counts once.

Warm-up: one event per source, then ingest's heartbeats close its windows: once a row of it is
readable, the job runs and has nothing to catch up on. Then ~300 events/s (orders and courier
pings, event time = now) go to the raw topics, through ingest (in a thread, heartbeats on) and
the stream job of three views:
  - orders and pings, via ingest. Orders never land on partition 3 of their events topic
    (their keys hash elsewhere): only heartbeats move it. A key goes quiet after 10 s (its rows
    go on while the others move, then its closing row). Every 5 s the 100 newest orders are
    published again (as after an ingest crash): each counts once.
  - direct pings, produced straight to the events topic (no ingest, so no heartbeats) to
    partitions 0-2 only after the warm-up: Flink's idle timeout (opt-in,
    JobOptions.idle_timeout_s) stops partition 3 from holding the watermark back.
After 40 s, production stops. Ingest keeps writing heartbeats, so the last windows of the
ingested views (and every closing row) still close on time; the direct view, with nothing to
advance its event time, closes nothing more (as it should not).
A poller reads every entity's newest row from Redis every 50 ms; per (view, window end) the
delay is the time the row of its last entity became readable minus the servable time.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from core.kafka import PRODUCER_DEFAULTS, ensure_topics
from core.records import DeadLetter, FeatureRow, is_heartbeat
from core.settings import Settings
from events.ingest import IngestCounts, run_ingest
from features.contract import servable_at_ms
from features.definitions import FeatureView
from features.reference import compute_view, with_closing_rows
from features.schema import EventSource
from streaming.compile import features_topic
from streaming.job import JobOptions
from streaming.monitor import StreamReport
from streaming.runner import run as run_stream
from streaming.sinks import now_ms
from tests.helpers.stream import PARTITIONS, patient_store, read_all, row_differences
from tests.helpers.stream_definitions import live_restaurant_orders, live_zone_couriers

pytestmark = [
    pytest.mark.integration,
    pytest.mark.flink,
    pytest.mark.slow,
    # The job runs in this process (PyFlink's loopback mode for local runs): Beam's gRPC reader
    # thread sometimes raises as the job is stopped.
    pytest.mark.filterwarnings(
        "ignore:Exception in thread read_grpc_client_inputs"
        ":pytest.PytestUnhandledThreadExceptionWarning"
    ),
]

ORDERS_PER_TICK, PINGS_PER_TICK, TICK_S = 2, 1, 0.01  # 300 events/s through ingest
DIRECT_EVERY = 3  # ticks: ~33 direct pings/s
LIVE_S = 40.0  # traffic, once the job is up
QUIET_AFTER_S = 10.0


def partition_of(key: str) -> int:
    """librdkafka's default partitioner (consistent_random): CRC-32 of the key."""
    return zlib.crc32(key.encode()) % PARTITIONS


# Orders keys that never land on partition 3: only heartbeats move it.
RESTAURANTS = [k for k in (f"r{i:03d}" for i in range(80)) if partition_of(k) != 3][:40]
QUIET_KEY = next(k for k in (f"r-quiet{i}" for i in range(20)) if partition_of(k) != 3)
ZONES = [f"z{i:02d}" for i in range(8)]
DIRECT_ZONES = [f"y{i:02d}" for i in range(6)]
BURST = 100  # repeats of the newest orders, every 5 s


def isolated(view: FeatureView, tag: str, name: str) -> FeatureView:
    source = view.source.model_copy(
        update={"topic": f"{tag}.events.{name}", "raw_topic": f"{tag}.raw.{name}"}
    )
    return view.model_copy(update={"name": f"{name}_{tag}", "source": source})


class Traffic:
    """The producer thread: raw orders and pings, repeats, and direct pings."""

    def __init__(self, settings: Settings, orders: EventSource, pings: EventSource) -> None:
        self.producer = Producer(
            settings.kafka_client_config(**(PRODUCER_DEFAULTS | {"linger.ms": 2}))
        )
        self.orders, self.pings = orders, pings
        self.direct_topic = ""
        self.raw_orders: list[bytes] = []  # as produced, repeats included
        self.quiet_until_ms = 0
        self.stop = threading.Event()
        self.stopped_at_ms = 0

    def direct(self, zone: str, t: int, partition: int, n: int) -> None:
        event = {
            "courier_id": f"d{n % 50}",
            "zone_id": zone,
            "speed_kmh": 10.0 + n % 20,
            "lat": 52.5,
            "lon": 13.4,
            "pinged_at": t,
        }
        self.producer.produce(
            self.direct_topic, orjson.dumps(event), zone.encode(), partition=partition, timestamp=t
        )

    def warm_up(self) -> None:
        """One event per source (and per partition of the direct topic): nothing to catch up."""
        t = now_ms()
        order = {
            "order_id": "o-warm",
            "restaurant_id": RESTAURANTS[0],
            "zone_id": ZONES[0],
            "items": 1,
            "subtotal": 1.0,
            "distance_km": 1.0,
            "placed_at": t,
        }
        value = orjson.dumps(order)
        self.producer.produce(self.orders.raw_topic, value, RESTAURANTS[0].encode())
        self.raw_orders.append(value)
        ping = {
            "courier_id": "c-warm",
            "zone_id": ZONES[0],
            "speed_kmh": 10.0,
            "lat": 52.5,
            "lon": 13.4,
            "pinged_at": t,
        }
        self.producer.produce(self.pings.raw_topic, orjson.dumps(ping))
        for partition in range(PARTITIONS):  # partition 3 gets no more
            self.direct(f"{DIRECT_ZONES[partition]}-warm", t, partition, partition)
        assert self.producer.flush(30) == 0

    def run(self) -> None:
        began, tick, n = time.monotonic(), 0, 0
        self.quiet_until_ms = now_ms() + int(QUIET_AFTER_S * 1000)
        last_burst = began
        while not self.stop.is_set():
            t = now_ms()
            for _ in range(ORDERS_PER_TICK):
                key = RESTAURANTS[n % len(RESTAURANTS)]
                if t < self.quiet_until_ms and n % 10 == 0:
                    key = QUIET_KEY
                order = {
                    "order_id": f"o{n}",
                    "restaurant_id": key,
                    "zone_id": ZONES[n % 8],
                    "items": 1 + n % 5,
                    "subtotal": 10.0 + n % 50,
                    "distance_km": 2.0,
                    "placed_at": t,
                }
                value = orjson.dumps(order)
                self.producer.produce(self.orders.raw_topic, value, key.encode(), timestamp=t)
                self.raw_orders.append(value)
                n += 1
            for _ in range(PINGS_PER_TICK):
                ping = {
                    "courier_id": f"c{n % 100:03d}",
                    "zone_id": ZONES[n % 8],
                    "speed_kmh": 10.0 + n % 23,
                    "lat": 52.5,
                    "lon": 13.4,
                    "pinged_at": t,
                }
                self.producer.produce(self.pings.raw_topic, orjson.dumps(ping), timestamp=t)
                n += 1
            if tick % DIRECT_EVERY == 0:  # each zone on one of partitions 0-2
                zone = tick // DIRECT_EVERY % len(DIRECT_ZONES)
                self.direct(DIRECT_ZONES[zone], t, zone % 3, n)
            if time.monotonic() - last_burst >= 5:  # an ingest crash replays its last records
                last_burst = time.monotonic()
                for value in self.raw_orders[-BURST:]:
                    key = orjson.loads(value)["restaurant_id"]
                    self.producer.produce(self.orders.raw_topic, value, key.encode(), timestamp=t)
                    self.raw_orders.append(value)
            self.producer.poll(0)
            tick += 1
            time.sleep(max(0.0, began + tick * TICK_S - time.monotonic()))
        self.stopped_at_ms = now_ms()
        assert self.producer.flush(30) == 0


class Poller:
    """Reads every entity's newest row every 50 ms: (view, entity, end) -> first seen (ms)."""

    def __init__(self, settings: Settings, views: list[tuple[FeatureView, list[str]]]) -> None:
        self.settings, self.views = settings, views
        self.seen: dict[tuple[str, str, int], int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        # This poller measures when rows become readable (the time before each read): a timed
        # out read would end it and lose every later row (patient_store).
        with patient_store(self.settings) as store:
            while not self.stop.is_set():
                for view, keys in self.views:
                    wall = now_ms()
                    for key, row in zip(keys, store.read(view, keys), strict=True):
                        if row is not None:
                            self.seen.setdefault((view.name, key, row.window_end_ms), wall)
                time.sleep(0.05)


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def body() -> None:
        try:
            result["value"] = target()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, result


def outcome(thread: threading.Thread, result: dict[str, Any], what: str) -> Any:
    thread.join(timeout=180)
    assert not thread.is_alive(), f"{what} did not stop"
    if "error" in result:
        raise result["error"]
    return result["value"]


def quantiles(samples: list[int]) -> str:
    q = statistics.quantiles(samples, n=100)
    return f"p50 {q[49]:.0f} ms, p99 {q[98]:.0f} ms, max {max(samples)} ms (n={len(samples)})"


def test_every_window_is_servable_on_time_and_repeats_count_once(
    stack_settings: Settings, tmp_path: Path
):
    tag = f"o{uuid.uuid4().hex[:8]}"
    settings = stack_settings.model_copy(
        update={
            "dead_letter_topic": f"{tag}.dead-letter",
            "state_dir": tmp_path,
            "feast_project": tag,
            "ingest_heartbeat_ms": 1000,
        }
    )
    orders_view = isolated(live_restaurant_orders, tag, "orders")
    pings_view = isolated(live_zone_couriers, tag, "pings")
    direct_view = isolated(live_zone_couriers, tag, "direct")  # not ingested: no heartbeats
    views = [orders_view, pings_view, direct_view]
    ingested = [orders_view, pings_view]
    sources = [v.source for v in ingested]
    ensure_topics(
        settings,
        [v.source.topic for v in views] + [s.raw_topic for s in sources],
        partitions=PARTITIONS,
    )
    traffic = Traffic(settings, orders_view.source, pings_view.source)
    traffic.direct_topic = direct_view.source.topic
    direct_keys = [*DIRECT_ZONES, *(f"{DIRECT_ZONES[p]}-warm" for p in range(PARTITIONS))]
    poller = Poller(
        settings,
        [
            (orders_view, [*RESTAURANTS, QUIET_KEY]),
            (pings_view, ZONES),
            (direct_view, direct_keys),
        ],
    )
    stop_ingest, stop_stream = threading.Event(), threading.Event()
    lines: list[str] = []

    def ingest() -> IngestCounts:
        return run_ingest(
            settings,
            sources,
            group_id=f"{tag}-ingest",
            idle_timeout_s=0,  # runs until stopped, writing heartbeats
            should_stop=stop_ingest.is_set,
        )

    def stream() -> StreamReport:
        return run_stream(
            settings,
            views,
            options=JobOptions(idle_timeout_s=2.0),  # for the direct view
            report_every_s=5,
            echo=lines.append,
            should_stop=stop_stream.is_set,
        )

    stream_thread, stream_result = in_thread(stream)
    ingest_thread, ingest_result = in_thread(ingest)
    producer_thread = threading.Thread(target=traffic.run, daemon=True)
    poller_thread = threading.Thread(target=poller.run, daemon=True)
    try:
        traffic.warm_up()
        poller_thread.start()
        deadline = time.monotonic() + 150
        while not any(k[0] == orders_view.name for k in poller.seen):
            assert stream_thread.is_alive(), stream_result.get("error")
            assert time.monotonic() < deadline, "no row within 150 s:\n" + "\n".join(lines)
            time.sleep(0.2)
        measure_from = now_ms()
        producer_thread.start()
        time.sleep(LIVE_S)
        traffic.stop.set()
        producer_thread.join(timeout=60)
        stopped = traffic.stopped_at_ms

        # Ingest goes on writing heartbeats: wait for every row the events make, closing rows
        # included (the last ends 65 s after the last event).
        time.sleep(5)  # ingest forwards the last events, the stream dead-letters late ones
        want = {v.name: expected_rows(settings, v) for v in ingested}
        expected = {(n, *k) for n, rows in want.items() for k in rows if k[1] >= measure_from}
        deadline = time.monotonic() + 120
        while (missing := expected - set(poller.seen)) and time.monotonic() < deadline:
            assert stream_thread.is_alive(), stream_result.get("error")
            time.sleep(1)
        assert not missing, f"rows never readable: {sorted(missing)[:10]}"
    finally:
        traffic.stop.set()
        stop_stream.set()
        report: StreamReport = outcome(stream_thread, stream_result, "the stream")
        stop_ingest.set()
        counts: IngestCounts = outcome(ingest_thread, ingest_result, "ingest")
        poller.stop.set()
        poller_thread.join(timeout=10)
    print("\n".join(lines))

    # Freshness: per (view, end), the row of its last entity readable minus the servable time.
    delays: dict[tuple[str, int], int] = {}
    for (name, _key, end), wall in poller.seen.items():
        view = next(v for v in views if v.name == name)
        if end < measure_from:
            continue
        if view is direct_view and servable_at_ms(view, end) > stopped:
            continue  # no heartbeats: nothing closes its windows after production stopped
        delay = wall - servable_at_ms(view, end)
        delays[(name, end)] = max(delays.get((name, end), delay), delay)
    by_row = [
        wall - servable_at_ms(orders_view, end)
        for (name, _key, end), wall in poller.seen.items()
        if name == orders_view.name and end >= measure_from
    ]
    after_stop = [d for (_, end), d in delays.items() if end > stopped]
    direct = [d for (name, _), d in delays.items() if name == direct_view.name]
    print(f"servable -> readable in Redis, per (view, end): {quantiles(list(delays.values()))}")
    print(f"  per row (orders): {quantiles(by_row)}")
    print(f"  closed by heartbeats after traffic stopped: {quantiles(after_stop)}")
    print(f"  direct view (partition 3 idle, no heartbeats): {quantiles(direct)}")
    assert statistics.quantiles(delays.values(), n=100)[98] <= 1000
    assert max(after_stop) <= 1000, "heartbeats close the last windows on time"
    assert len({end for name, end in delays if name == orders_view.name and end > stopped}) >= 10
    assert len(direct) >= 6, "the direct view's windows closed while partition 3 was idle"
    assert max(direct) <= 1000, "an idle partition holds nothing back"
    quiet = sorted(end for key, end in want[orders_view.name] if key == QUIET_KEY)
    assert quiet[-1] > quiet[0] + 60_000, "the quiet key has rows up to its closing row"
    assert all(delays[(orders_view.name, end)] <= 1000 for end in quiet)

    # Partition 3 of the orders topic holds only heartbeats: they alone moved it.
    on_three = [m for m in read_all(settings, orders_view.source.topic) if m.partition() == 3]
    assert on_three
    assert all(is_heartbeat(m.headers()) for m in on_three)

    # Counts: every event read was counted once, filtered, dead-lettered or a repeat.
    assert counts.balanced()
    assert counts.heartbeats > 0
    late = late_letters(settings)
    for view in views:
        stats = report.views[view.name]
        assert stats.balanced(), (view.name, stats)
        assert stats.late == sum(late[view.name].values()), view.name
        assert (stats.heartbeats > 0) == (view is not direct_view), view.name
    assert sum(late[v.name].total() for v in views) == 0, "no event late, live"
    orders = report.views[orders_view.name]
    assert orders.events == len(traffic.raw_orders) == counts.by_source["orders"]
    # Per event: if its first copy was late, every copy was (the watermark only grows);
    # otherwise it counted once, and each other copy is late or a duplicate.
    copies = Counter(events_of(settings, orders_view))
    late_orders = late[orders_view.name]
    first_late = {v for v, n in copies.items() if late_orders[v] == n}
    assert orders.aggregated == len(copies) - len(first_late)
    assert orders.duplicates == sum(
        n - 1 - late_orders[v] for v, n in copies.items() if v not in first_late
    )
    assert orders.duplicates == len(traffic.raw_orders) - len(set(traffic.raw_orders)) > 0

    # Every row the stream emitted equals the reference over unique, not late, events.
    for view in ingested:
        assert row_differences(emitted_rows(settings, view), want[view.name]) == [], view.name
    got = emitted_rows(settings, direct_view)
    direct_want = expected_rows(settings, direct_view)
    assert got
    assert row_differences(got, {k: direct_want[k] for k in got if k in direct_want}) == []


def late_letters(settings: Settings) -> dict[str, Counter[bytes]]:
    """Per view, the values the stream dead-lettered as late, with how often."""
    out: dict[str, Counter[bytes]] = defaultdict(Counter)
    for msg in read_all(settings, settings.dead_letter_topic, idle_s=1.0):
        letter = DeadLetter.from_headers(msg.headers())
        if letter.reason == "late" and letter.view:
            out[letter.view][msg.value() or b""] += 1
    return out


def unique_late(settings: Settings, view: FeatureView, late: dict[str, Counter[bytes]]) -> int:
    copies = Counter(events_of(settings, view))
    return sum(1 for value, n in late[view.name].items() if n >= copies[value])


def events_of(settings: Settings, view: FeatureView) -> list[bytes]:
    """The view's events as read from its topic, repeats included (heartbeats are not)."""
    return [
        m.value() or b"" for m in read_all(settings, view.source.topic, 2.0, skip_heartbeats=True)
    ]


def expected_rows(settings: Settings, view: FeatureView) -> dict[tuple[str, int], dict[str, Any]]:
    """The reference over the view's events, each once, less those dead-lettered late (every
    copy: a repeat is late only if the first copy was, since the watermark only grows)."""
    values = events_of(settings, view)
    copies = Counter(values)
    late = late_letters(settings)[view.name]
    counted = [orjson.loads(v) for v in copies if late[v] < copies[v]]
    return with_closing_rows(view, compute_view(view, counted))


def emitted_rows(settings: Settings, view: FeatureView) -> dict[tuple[str, int], dict[str, Any]]:
    got: dict[tuple[str, int], dict[str, Any]] = {}
    for msg in read_all(settings, features_topic(view.name), idle_s=1.0):
        row = FeatureRow.decode(msg.value())
        key = (row.entity_key, row.window_end_ms)
        assert key not in got or got[key] == row.values, f"{key} differs when repeated"
        got[key] = row.values
    return got
