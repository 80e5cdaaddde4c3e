package sluice;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashSet;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.Set;
import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.state.MapState;
import org.apache.flink.api.common.state.MapStateDescriptor;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.java.tuple.Tuple3;
import org.apache.flink.streaming.api.TimeDomain;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.types.Row;
import org.apache.flink.util.Collector;
import org.apache.flink.util.OutputTag;

/**
 * The tile engine's window assembly in the JVM (engine "tiles-java", streaming/java_windows.py):
 * keyed by shard of entities, as streaming/tile_functions.py is. Its input is the tile query's
 * (shard, row) rows (streaming/tiles.py).
 *
 * <ul>
 *   <li>A tile row (an entity's partial states of one slide bucket) is merged into the entity's
 *       state (MapState entity to WindowAssembler.EntityWindows), and an event-time timer is set
 *       at the tile's end (Flink keeps one per shard and time).
 *   <li>A timer fires every end due in the shard up to the watermark (WindowAssembler.fire,
 *       the Python engine's rows): every row goes to the side output {@link #FEATURE_ROWS}, a
 *       features-topic record (Flink's Kafka sink writes it), and the newest row of each
 *       entity of the firing goes on, as a row of kind "W" (entity, end, its record in
 *       ``raw``, the rows of the firing in ``copies``, the watermark that fired them in
 *       ``off``), to the Python function, which writes
 *       the online store (only the newest row per entity matters there) and counts.
 *   <li>Every other row (read, side, closed and the filter's rows, under the side key) goes on
 *       to the Python function unchanged: it counts them and dead-letters events.
 * </ul>
 *
 * <p>Statistics that survive a restore: each shard keeps the rows its firings wrote, over every
 * run, in its state; the first time a run touches a shard it sends that number on (kind "X")
 * when it is not zero, and a processing-time timer per shard (every second) makes sure a
 * restored run touches every shard soon (as tile_state.py's ROWS_ENTRY and the shard ticks).
 */
public class TileWindows extends KeyedProcessFunction<Row, Row, Row> {
    public static final OutputTag<Tuple3<String, Long, String>> FEATURE_ROWS =
            new OutputTag<>("feature-rows", Types.TUPLE(Types.STRING, Types.LONG, Types.STRING));
    static final long TICK_MS = 1_000;
    static final int SLOTS_FROM = 11; // streaming/tiles.py FIXED
    static final String TILE = "T";

    private final String plan;
    private final int arity; // columns of the tile query's row
    private transient WindowAssembler windows;
    private transient FeatureRows encoder;
    private transient MapState<String, WindowAssembler.EntityWindows> entities;
    private transient ValueState<Long> rowsWritten;
    private transient Set<Object> touched;

    public TileWindows(String plan, int arity) {
        this.plan = plan;
        this.arity = arity;
    }

    @Override
    public void open(OpenContext context) {
        windows = new WindowAssembler(plan);
        encoder = new FeatureRows(windows.view, windows.names);
        entities =
                getRuntimeContext()
                        .getMapState(
                                new MapStateDescriptor<>(
                                        "windows",
                                        Types.STRING,
                                        TypeInformation.of(WindowAssembler.EntityWindows.class)));
        rowsWritten = getRuntimeContext().getState(new ValueStateDescriptor<>("rows", Types.LONG));
        touched = new HashSet<>();
    }

    @Override
    public void processElement(Row value, Context ctx, Collector<Row> out) throws Exception {
        Row row = (Row) value.getField(1);
        String entity = (String) row.getField(1);
        if (!TILE.equals(row.getField(0)) || entity == null) {
            out.collect(value); // counted by the Python function
            return;
        }
        touch(ctx.getCurrentKey(), ctx.timerService(), out);
        long t = (Long) row.getField(2);
        long bucket = t - Math.floorMod(t, windows.slide);
        List<Object> columns = new ArrayList<>(arity);
        for (int i = 0; i < arity; i++) {
            columns.add(row.getField(i));
        }
        WindowAssembler.EntityWindows state = entities.get(entity);
        if (state == null) {
            state = new WindowAssembler.EntityWindows();
        }
        if (windows.addTile(state, bucket, windows.decode(columns, SLOTS_FROM))) {
            ctx.timerService().registerEventTimeTimer(bucket + windows.slide);
        }
        entities.put(entity, state);
    }

    /** The first touch of a shard in this run: its rows written before, and its tick. */
    private void touch(Row key, org.apache.flink.streaming.api.TimerService timers, Collector<Row> out)
            throws Exception {
        if (!touched.add(key)) {
            return;
        }
        Long before = rowsWritten.value();
        if (before != null && before > 0) {
            out.collect(Row.of(key.getField(0), record("X", null, null, before, null)));
        }
        long now = timers.currentProcessingTime();
        timers.registerProcessingTimeTimer(now - now % TICK_MS + TICK_MS);
    }

    @Override
    public void onTimer(long timestamp, OnTimerContext ctx, Collector<Row> out) throws Exception {
        Row key = ctx.getCurrentKey();
        if (ctx.timeDomain() == TimeDomain.PROCESSING_TIME) {
            if (!touched.contains(key)) {
                touch(key, ctx.timerService(), out);
            } else {
                ctx.timerService().registerProcessingTimeTimer(timestamp + TICK_MS);
            }
            return;
        }
        touch(key, ctx.timerService(), out);
        // Every end up to the watermark is final, not only up to this timer.
        long watermark = ctx.timerService().currentWatermark();
        long upto = Math.max(timestamp, watermark);
        long following = WindowAssembler.NONE;
        long now = System.currentTimeMillis();
        long written = 0;
        Iterator<Map.Entry<String, WindowAssembler.EntityWindows>> all = entities.iterator();
        List<Object[]> changed = new ArrayList<>();
        while (all.hasNext()) {
            Map.Entry<String, WindowAssembler.EntityWindows> entry = all.next();
            WindowAssembler.EntityWindows state = entry.getValue();
            long due = windows.nextTimer(state);
            if (due != WindowAssembler.NONE && due <= upto) {
                String entity = entry.getKey();
                String[] newest = new String[1];
                long[] end = new long[1];
                int rows =
                        windows.fire(
                                state,
                                upto,
                                (rowEnd, values) -> {
                                    newest[0] = encoder.encode(entity, rowEnd, values, now);
                                    end[0] = rowEnd;
                                    ctx.output(FEATURE_ROWS, Tuple3.of(entity, rowEnd, newest[0]));
                                });
                if (rows > 0) {
                    written += rows;
                    Row online = record("W", entity, end[0], (long) rows, newest[0]);
                    online.setField(4, watermark); // the watermark that fired it, in ``off``
                    out.collect(Row.of(key.getField(0), online));
                }
                changed.add(new Object[] {entity, state});
                due = windows.nextTimer(state);
            }
            if (due != WindowAssembler.NONE && (following == WindowAssembler.NONE || due < following)) {
                following = due;
            }
        }
        for (Object[] change : changed) {
            WindowAssembler.EntityWindows state = (WindowAssembler.EntityWindows) change[1];
            if (state.tiles.isEmpty()) {
                entities.remove((String) change[0]);
            } else {
                entities.put((String) change[0], state);
            }
        }
        if (written > 0) {
            Long before = rowsWritten.value();
            rowsWritten.update((before == null ? 0 : before) + written);
        }
        if (following != WindowAssembler.NONE) {
            ctx.timerService().registerEventTimeTimer(following);
        }
    }

    /** A row of the tile query's shape: kind, entity, t, rows in copies and uniq, raw. */
    private Row record(String kind, String entity, Long t, Long rows, String raw) {
        Object[] fields = new Object[arity];
        Arrays.fill(fields, null);
        fields[0] = kind;
        fields[1] = entity;
        fields[2] = t;
        fields[5] = rows;
        fields[6] = rows;
        fields[7] = false;
        fields[8] = false;
        fields[9] = raw == null ? null : raw.getBytes(StandardCharsets.UTF_8);
        return Row.of(fields);
    }
}
