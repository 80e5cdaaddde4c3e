"""The tile engine's Python function: one row per (entity, tile) in, rows of windows out.

The SQL of streaming/tiles.py hands over tile rows (partial states of one entity's slide bucket,
deduplicated, already past the watermark) and side rows (heartbeats, unreadable and late
events, with their raw bytes), each with its entity's shard (computed in the SQL, keyed in
Java: job._keyed_by_shard). One KeyedProcessFunction keyed by shard (side rows and the
filtered counts under the key SIDE_KEY) merges tiles into each entity's state
(streaming/windows.py, the event engine's window code; streaming/tile_state.py), fires one
event-time timer per shard at the earliest end due in it and writes rows, dead letters
and statistics with the event engine's writers (streaming/sinks.py), flushed at bundle ends
(see streaming/functions.py for why that is at least once).

Engine "tiles-java" (``java_windows``): the JVM assembles the windows between the SQL and this
function (streaming/java/sluice/TileWindows.java) and writes the features topic; this function
gets the side key's rows as above, the newest row of each entity per firing (KIND_WINDOW: held
for the online store, its rows counted) and each shard's rows written before a restore
(KIND_RESTORED), and no tile rows; it fires no windows.

Counters: events are counted when read, from the read rows (per partition and 100 ms of
processing time, streaming/tiles.py), and processed when their tile closes: every event is
then one of: an event of a closed row (the kept events of the tiles of one slide:
copies = aggregated + duplicates) or of an entity-less tile row (filtered); an event of a side
row (filtered, late or rejected, as the event engine's parser decides). Between the two it is
``open`` (WindowCounts): read, its tile still open in the SQL window state. A stop with a
snapshot carries open tiles to the next run, which closes them (its ``open`` goes below zero
by as many), so events read over runs add up to what the topic holds and each run balances as
events == processed + open; a bounded run ends with every tile closed (open == 0). Heartbeats
arrive as side rows. All of these rows come under the side key, and the counters are that
key's state too (streaming/tile_counts.py): a restored run reports the snapshot's counters
beside its own. The rows written are counted per shard, in the shard's state
(tile_state.ROWS_ENTRY), and each shard keeps a processing-time timer (SHARD_TICK_MS), so that
a restored run reads every shard back, and reports their rows as restored, within a second.
The three records per subtask (prepare, windows, publish) come from this one function.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from core.kafka import CountingProducer
from core.stream_stats import PrepareCounts, PublishCounts, WindowCounts
from features.validation import Rejection, RejectReason
from streaming import fast_rows
from streaming.compile import CompiledView
from streaming.functions import ProgressClock, flush_writers, on_bundle_end, subtask_slot
from streaming.prepare import EventPreparer, Filtered
from streaming.sinks import DeadLetters, JobContext, RowPublisher, StatsReporter, now_ms
from streaming.tile_counts import CarriedCounts
from streaming.tile_state import (
    COUNTS_ENTRY,
    SIDE_KEY,
    MapEntry,
    Shard,
    ShardStates,
    fire_shard,
)
from streaming.tiles import (
    COPIES,
    HEARTBEAT,
    KEY,
    KIND,
    KIND_CLOSED,
    KIND_READ,
    KIND_RESTORED,
    KIND_SIDE,
    KIND_TILE,
    KIND_WINDOW,
    LATE,
    OFF,
    PART,
    RAW,
    RAW_KEY,
    UNIQUE,
    T,
    state_decoder,
)
from streaming.windows import Added, WindowEngine

END_OF_INPUT = 2**63 - 1  # Flink's watermark at the end of a bounded input
# Every shard this instance read keeps a processing-time timer at the next multiple of this:
# a restore brings the timers back, so a restored run reads every shard within about this
# long and knows the rows written before the snapshot (tile_state.ROWS_ENTRY), even a shard
# no tile row or firing would reach soon. Aligned, so two chains on one shard are one timer.
SHARD_TICK_MS = 1_000


def tile_function(compiled: CompiledView, ctx: JobContext, *, java_windows: bool = False) -> Any:
    """The KeyedProcessFunction of one view's tile rows; ``java_windows``: of the rows of the
    JVM's window assembly instead of the tile rows (engine "tiles-java": windows, counts and
    side rows; streaming/java/sluice/TileWindows.java)."""
    from pyflink.datastream import KeyedProcessFunction

    slide = compiled.slide_ms

    class Tiles(KeyedProcessFunction):  # type: ignore[misc]
        def open(self, runtime_context: Any) -> None:
            from pyflink.common import Types
            from pyflink.datastream.state import MapStateDescriptor

            fast_rows.install()  # the keyed operator builds and reads Row keys per element
            self.engine = WindowEngine(compiled)
            self.decode = state_decoder(compiled)
            self.preparer = EventPreparer(compiled)
            # The one state of every key. Per shard: its entities' tiles, one entry each, the
            # first end it has not fired and its rows written; under the side key, the
            # counters (streaming/tile_state.py).
            descriptor = MapStateDescriptor("tiles", Types.STRING(), Types.PICKLED_BYTE_ARRAY())
            state = runtime_context.get_map_state(descriptor)
            self.states = ShardStates(state)
            self.producer = CountingProducer(ctx.settings)
            slot = subtask_slot(runtime_context)
            self.publisher = RowPublisher(self.producer, ctx, compiled.view, slot)
            self.clock = ProgressClock(self.publisher)
            self.dead = DeadLetters(self.producer, ctx, compiled.view)
            self.read = PrepareCounts()
            self.windows = WindowCounts()
            self.stats = StatsReporter(self.producer, ctx, compiled.name, slot[0])
            self.carried = CarriedCounts(
                MapEntry(state, COUNTS_ENTRY), self.read, self.windows, self.stats
            )
            self.late_counter = runtime_context.get_metrics_group().counter("late_events")
            on_bundle_end(runtime_context, "sluice_tiles_flush", self.flush)
            self.ended = False  # the watermark reached its maximum: the input ended
            # Rows written before a restore, as the JVM's shards report them (tiles-java).
            self.restored_rows = 0
            self.end_timer = False  # tiles-java: a timer set to see the end of the input

        def process_element(self, row: Any, context: Any) -> None:
            read = self.read
            partition = row[PART]
            if partition is not None:
                read.offsets[partition] = max(read.offsets.get(partition, 0), row[OFF] + 1)
            read.last_at_ms = now_ms()
            read.first_at_ms = read.first_at_ms or read.last_at_ms
            watermark = context.timer_service().current_watermark()
            read.watermark = watermark
            self.publisher.observe(watermark)
            self.clock.start(context)
            kind = row[KIND]
            entity = row[KEY]
            if java_windows:
                self.from_java(row, kind, watermark, context)
                return
            if kind != KIND_TILE or entity is None:
                self.count(row, kind, watermark)
                return
            t = row[T]
            bucket = t - t % slide
            shard = self.states.shard(context.get_current_key())
            self.keep_ticking(shard, context)
            cached = self.states.entity(shard, entity)
            new = self.engine.add_tile(cached.state, bucket, self.decode(row)) is Added.NEW_TILE
            if new:
                # One timer per shard: the earliest end due in it. Every firing registers the
                # shard's next due end, so a tile ending later needs none of its own.
                due = bucket + slide
                if shard.pending is None or due < shard.pending:
                    context.timer_service().register_event_time_timer(due)
                    shard.pending = due
            self.states.tile_changed(shard, entity, cached, bucket, new)

        def from_java(self, row: Any, kind: str, watermark: int, context: Any) -> None:
            """A row of the JVM's window assembly: a window row to hold for the online store,
            a shard's rows written before a restore, or a row to count as below."""
            if not self.end_timer:
                # The end of the input, seen by a timer (no row comes after it; close() needs
                # it): the last event time a long holds fires only at the maximal watermark.
                context.timer_service().register_event_time_timer(END_OF_INPUT - 1)
                self.end_timer = True
            if kind == KIND_WINDOW:
                values = orjson.loads(row[RAW])["values"]
                self.publisher.hold(row[KEY], row[T], values, row[COPIES], fired_by=row[OFF])
            elif kind == KIND_RESTORED:
                self.restored_rows += row[COPIES]
            else:
                self.count(row, kind, watermark)

        def count(self, row: Any, kind: str, watermark: int) -> None:
            """A row of the side key: count it, then keep the counters in its state."""
            self.carried.load()
            copies = row[COPIES]
            if kind == KIND_READ:
                # Counted when read; processed when its tile closes (closed and filter rows).
                self.read.events += copies
                self.windows.open += copies
            elif kind == KIND_SIDE:
                self.side(row, watermark)
            elif kind == KIND_CLOSED:  # the kept events of one partition's closed tiles
                self.windows.open -= copies
                self.windows.aggregated += row[UNIQUE]
                self.windows.duplicates += copies - row[UNIQUE]
            else:  # a tile row without entity: the events the view's filter dropped
                self.windows.open -= copies
                self.read.filtered += copies
            self.carried.save()

        def side(self, row: Any, watermark: int) -> None:
            read = self.read
            if row[HEARTBEAT]:
                read.heartbeats += 1
                return
            self.windows.open -= 1  # read (a read row counts it): processed here and now
            t = row[T]
            # Late by the SQL's check (end <= W + 1 there): at least that watermark. Not late:
            # none, and the parser names why SQL could not read the event.
            watermark = max(watermark, t - t % slide + slide) if row[LATE] else -(2**63)
            outcome = self.preparer.prepare(row[RAW], watermark)
            if isinstance(outcome, Filtered):
                read.filtered += 1
                return
            if not isinstance(outcome, Rejection):
                outcome = Rejection(
                    RejectReason.WRONG_TYPE,
                    None,
                    "the stream's SQL decode could not read this event's entity or time",
                )
            if outcome.reason is RejectReason.LATE:
                read.late += 1
                self.late_counter.inc()
            else:
                read.rejected += 1
            self.dead.send(outcome, row[RAW], row[RAW_KEY], row[PART], row[OFF])

        def keep_ticking(self, shard: Shard, context: Any, *, ticked: bool = False) -> None:
            """The shard's processing-time timer (SHARD_TICK_MS), registered once per process
            unless ``ticked`` (it just fired: the next one)."""
            if shard.ticking and not ticked:
                return
            service = context.timer_service()
            now = service.current_processing_time()
            service.register_processing_time_timer(now - now % SHARD_TICK_MS + SHARD_TICK_MS)
            shard.ticking = True

        def on_timer(self, timestamp: int, context: Any) -> Iterator[Any]:
            yield from ()
            key = context.get_current_key()
            if self.clock.tick(context):  # a processing-time timer: the clock's, a shard's
                if key != SIDE_KEY and timestamp % SHARD_TICK_MS == 0 and not java_windows:
                    self.keep_ticking(self.states.shard(key), context, ticked=True)
                return
            if java_windows:  # the end-of-input timer: windows fire in the JVM
                watermark = context.timer_service().current_watermark()
                self.ended = watermark == END_OF_INPUT
                self.publisher.observe(watermark)
                return
            if key == SIDE_KEY:
                return
            shard = self.states.shard(key)
            self.keep_ticking(shard, context)
            watermark = context.timer_service().current_watermark()
            self.ended = watermark == END_OF_INPUT
            self.publisher.observe(watermark)
            # Every end up to the watermark is final, not only up to this timer: after a jump
            # of the watermark (end of input, catching up) one firing emits the whole run.
            upto = max(timestamp, watermark)
            shard.pending = fire_shard(self.engine, self.states, shard, upto, self.publisher.add)
            if shard.pending is not None:
                context.timer_service().register_event_time_timer(shard.pending)

        def flush(self) -> int:
            self.stats.restored(PublishCounts, {"rows": self.restored()})
            counts = (self.read, self.windows)
            flush_writers(self.producer, self.publisher, self.stats, counts)
            return self.read.events

        def restored(self) -> int:
            """Rows written before the snapshot this run restored, as far as read back."""
            return self.states.restored_rows + self.restored_rows

        def close(self) -> None:
            if self.ended:
                # The input ended (only its end brings the watermark to its maximum; a stop
                # with a savepoint does not): every tile has closed, so the events read are
                # the events processed. The read rows of the last interval may be missing:
                # a processing-time window does not fire when a Kafka source's bounded input
                # ends (measured), so the count is taken from the closed tiles.
                self.read.events -= self.windows.open
                self.windows.open = 0
            self.stats.restored(PublishCounts, {"rows": self.restored()})
            counts = (self.read, self.windows)
            flush_writers(self.producer, self.publisher, self.stats, counts, final=True)

    return Tiles()
