"""The job's PyFlink functions: thin adapters around prepare.py, windows.py and sinks.py.

PyFlink is imported inside ``flink_functions`` only (importing it costs seconds, and ruff bans
module-level imports of it), so the classes are built there; cloudpickle ships them to the
Python workers by value.

Bundle ends. PyFlink feeds Python functions in bundles (python.fn-execution.bundle.size/time)
and finishes a bundle before a checkpoint barrier passes the operator, but it gives user
functions no "bundle finished" callback. It does read every registered gauge when a bundle
finishes (Operation.finish -> _update_gauge), synchronously and before reporting the bundle
done; a gauge is therefore the hook where the writers flush. An exception there fails the
bundle, and Flink restarts from the last checkpoint: nothing is acknowledged that was not
written. Thread mode has no bundles of its own: streaming/python_operators.py gives it the
same bundle ends (streaming/bundle_ends.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from core.kafka import CountingProducer
from core.stream_stats import PrepareCounts, StageCounts, WindowCounts
from features.validation import Rejection, RejectReason
from streaming import bundle_ends, fast_rows
from streaming.compile import SOURCE_COLUMNS, CompiledView, check_event_engine
from streaming.errors import StreamJobError
from streaming.prepare import EventPreparer, Filtered
from streaming.sinks import DeadLetters, JobContext, RowPublisher, StatsReporter, now_ms
from streaming.windows import Added, Memo, Queues, State, WindowEngine, new_state

# Field positions of the rows the SQL source hands over (compile.source_query).
KEY, VALUE, PARTITION, OFFSET, HEARTBEAT = range(len(SOURCE_COLUMNS))


def on_bundle_end(runtime_context: Any, name: str, callback: Callable[[], int]) -> None:
    """Call ``callback`` at the end of every bundle: in process mode a gauge (see the module
    docstring for why), in thread mode by the operator (streaming/bundle_ends.py)."""
    token = runtime_context.get_job_parameter(bundle_ends.TOKEN, None)
    if token is not None:
        bundle_ends.register(token, callback)
    elif ".embedded." in type(runtime_context).__module__:
        # PyFlink's own thread-mode operator: nothing would ever call the flush.
        raise StreamJobError(
            f"{name}: a Python function runs in thread mode outside sluice's operators "
            "(build it with streaming.python_operators.process)"
        )
    else:
        runtime_context.get_metrics_group().gauge(name, callback)


def subtask_index(runtime_context: Any) -> int:
    """This operator instance's index. PyFlink 2.0's thread mode (PEMJA) calls
    RuntimeContext.getIndexOfThisSubtask, which Flink 2.0 removed (SystemError); its TaskInfo
    still has it."""
    try:
        return int(runtime_context.get_index_of_this_subtask())
    except SystemError:
        java = runtime_context._runtime_context
        return int(java.getTaskInfo().getIndexOfThisSubtask())


def subtask_slot(runtime_context: Any) -> tuple[int, int]:
    """(index, parallelism) of this operator instance (see subtask_index for thread mode)."""
    try:
        parallelism = int(runtime_context.get_number_of_parallel_subtasks())
    except SystemError:
        java = runtime_context._runtime_context
        parallelism = int(java.getTaskInfo().getNumberOfParallelSubtasks())
    return subtask_index(runtime_context), parallelism


class ProgressClock:
    """Brings the watermark to a windows operator that gets no input, so that its progress
    (RowPublisher.observe) keeps moving while its view is quiet.

    PyFlink's keyed functions see the watermark only with an element or a timer, and once every
    key of a quiet view is idle there are neither. One processing-time timer per operator
    instance, on the key it saw first, ticks every TICK_MS and carries the watermark. Ticks are
    aligned to multiples of TICK_MS, so that after a restore (timers are restored with the
    state, the instance's memory is not) two chains on one key fall on the same timer, which
    Flink keeps once; a chain on another key is dropped at its next tick.
    """

    TICK_MS = 200

    def __init__(self, publisher: RowPublisher) -> None:
        self._publisher = publisher
        self._key: Any = None

    def start(self, context: Any) -> None:
        """An element arrived: start ticking if no chain runs in this instance yet."""
        if self._key is None:
            self._key = context.get_current_key()
            self._schedule(context)

    def tick(self, context: Any) -> bool:
        """In on_timer: True when the timer was this clock's (then nothing else is to do)."""
        from pyflink.datastream import TimeDomain

        if context.time_domain() != TimeDomain.PROCESSING_TIME:
            return False
        key = context.get_current_key()
        if self._key is None:
            self._key = key  # a chain restored from a checkpoint
        if key == self._key:
            self._publisher.observe(context.timer_service().current_watermark())
            self._schedule(context)
        return True

    def _schedule(self, context: Any) -> None:
        service = context.timer_service()
        now = service.current_processing_time()
        service.register_processing_time_timer(now - now % self.TICK_MS + self.TICK_MS)


def fire_due(
    engine: WindowEngine,
    publisher: RowPublisher,
    state: State,
    key: str,
    timestamp: int,
    watermark: int,
    memo: Memo | None = None,
    queues: Queues | None = None,
) -> int | None:
    """A timer of ``key`` fired: publish every row that became final; the key's next timer
    (None: the key is idle, its state can go). Shared by both engines' window functions."""
    publisher.observe(watermark)
    # Every end up to the watermark is final, not only up to this timer: after a jump of the
    # watermark (end of input, catching up) one firing emits the whole run instead of one end
    # per Python round trip.
    for end, values in engine.fire(state, max(timestamp, watermark), memo, queues):
        publisher.add(key, end, values)
    return engine.next_timer(state)


def flush_writers(
    producer: CountingProducer,
    publisher: RowPublisher | None,
    stats: StatsReporter,
    counts: tuple[StageCounts, ...],
    *,
    final: bool = False,
) -> None:
    """At a bundle's end (or, ``final``, the operator's close): rows to the online store,
    statistics, then everything the producer holds; raises if a write failed."""
    if publisher is not None:
        publisher.flush(final)
        counts = (*counts, publisher.counts)
    for c in counts:
        stats.report(c, final=final)
    producer.flush()
    if final and publisher is not None:
        publisher.close()


def flink_functions(compiled: CompiledView, ctx: JobContext) -> tuple[Any, Any]:
    """(prepare, windows) function objects for one view."""
    from pyflink.datastream import KeyedProcessFunction, ProcessFunction

    check_event_engine(compiled)

    class Prepare(ProcessFunction):  # type: ignore[misc]
        """Drop heartbeats (they moved the watermark already, in the source); parse, apply
        derived columns and filter, dead-letter late events; emit (key, t, values, id)."""

        def open(self, runtime_context: Any) -> None:
            self.preparer = EventPreparer(compiled)
            self.producer = CountingProducer(ctx.settings)
            self.dead = DeadLetters(self.producer, ctx, compiled.view)
            self.counts = PrepareCounts()
            index = subtask_index(runtime_context)
            self.stats = StatsReporter(self.producer, ctx, compiled.name, index)
            self.late_counter = runtime_context.get_metrics_group().counter("late_events")
            on_bundle_end(runtime_context, "sluice_prepare_flush", self.flush)

        def process_element(self, row: Any, context: Any) -> Iterator[tuple[str, int, Any, int]]:
            counts = self.counts
            if row[HEARTBEAT]:
                # Not an event: neither read nor aggregated. Its offset is consumed all the same.
                counts.heartbeats += 1
                counts.offsets[row[PARTITION]] = row[OFFSET] + 1
                return
            watermark = context.timer_service().current_watermark()
            counts.events += 1
            counts.last_at_ms = now_ms()
            counts.first_at_ms = counts.first_at_ms or counts.last_at_ms
            counts.watermark = watermark
            counts.offsets[row[PARTITION]] = row[OFFSET] + 1
            outcome = self.preparer.prepare(row[VALUE], watermark)
            if isinstance(outcome, Filtered):
                counts.filtered += 1
            elif isinstance(outcome, Rejection):
                if outcome.reason is RejectReason.LATE:
                    counts.late += 1
                    self.late_counter.inc()
                else:
                    counts.rejected += 1
                self.dead.send(outcome, row[VALUE], row[KEY], row[PARTITION], row[OFFSET])
            else:
                yield outcome.key, outcome.t, outcome.values, outcome.event_id

        def flush(self) -> int:
            flush_writers(self.producer, None, self.stats, (self.counts,))
            return self.counts.events

        def close(self) -> None:
            flush_writers(self.producer, None, self.stats, (self.counts,), final=True)

    class Windows(KeyedProcessFunction):  # type: ignore[misc]
        """Tiles per key; a timer at each window end publishes the rows that became final.

        Rows are written from here, not from an operator downstream: a row crossing from
        Python to the JVM and back costs about as much as an event, and a catching-up job
        emits a row per key and slide (bench/stream.py).
        """

        def open(self, runtime_context: Any) -> None:
            from pyflink.common import Types
            from pyflink.datastream.state import ValueStateDescriptor

            fast_rows.install()  # the keyed operator builds and reads Row keys per element

            self.engine = WindowEngine(compiled)
            descriptor = ValueStateDescriptor("windows", Types.PICKLED_BYTE_ARRAY())
            self.state = runtime_context.get_state(descriptor)
            self.producer = CountingProducer(ctx.settings)
            slot = subtask_slot(runtime_context)
            self.publisher = RowPublisher(self.producer, ctx, compiled.view, slot)
            self.clock = ProgressClock(self.publisher)
            self.counts = WindowCounts()
            index = slot[0]
            # One reporter, two records: "windows" (these counts) and "publish" (the rows').
            self.stats = StatsReporter(self.producer, ctx, compiled.name, index)
            on_bundle_end(runtime_context, "sluice_windows_flush", self.flush)

        def process_element(self, event: tuple[str, int, Any, int], context: Any) -> None:
            _key, t, values, event_id = event
            self.publisher.observe(context.timer_service().current_watermark())
            self.clock.start(context)
            state = self.state.value() or new_state()
            added = self.engine.add(state, t, values, event_id)
            if added is Added.DUPLICATE:
                self.counts.duplicates += 1  # the state is unchanged
                return
            if added is Added.NEW_TILE:
                # One timer per new bucket (not per event): its first window end.
                first_end = self.engine.bucket(t) + compiled.slide_ms
                context.timer_service().register_event_time_timer(first_end)
            self.state.update(state)
            self.counts.aggregated += 1

        def on_timer(self, timestamp: int, context: Any) -> Iterator[Any]:
            # A generator, though it yields nothing: PyFlink iterates what on_timer returns.
            yield from ()
            if self.clock.tick(context):
                return
            state = self.state.value()
            if state is None:
                return
            key = context.get_current_key()
            watermark = context.timer_service().current_watermark()
            following = fire_due(self.engine, self.publisher, state, key, timestamp, watermark)
            if following is None:
                self.state.clear()  # idle keys cost nothing
            else:
                context.timer_service().register_event_time_timer(following)
                self.state.update(state)

        def flush(self) -> int:
            flush_writers(self.producer, self.publisher, self.stats, (self.counts,))
            return self.counts.aggregated

        def close(self) -> None:
            flush_writers(self.producer, self.publisher, self.stats, (self.counts,), final=True)

    return Prepare(), Windows()
