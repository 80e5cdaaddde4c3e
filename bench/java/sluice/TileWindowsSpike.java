package sluice;

import java.util.Iterator;
import java.util.Map;
import java.util.TreeMap;
import org.apache.flink.api.common.state.MapState;
import org.apache.flink.api.common.state.MapStateDescriptor;
import org.apache.flink.api.common.typeinfo.TypeHint;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.types.Row;
import org.apache.flink.util.Collector;

/**
 * A measurement spike, not the engine: window assembly in the JVM over the tile rows, keyed by
 * shard, for one aggregation (the unique events of each window, summed from tiles). It emits
 * a row per entity and window end while the entity's longest window holds a tile, and one
 * closing row when it empties: the row volume of the Python operator, to bound what moving
 * window assembly into Java would buy (bench/stream_java.py).
 */
public class TileWindowsSpike extends KeyedProcessFunction<Row, Row, String> {
    private static final long OPEN = Long.MIN_VALUE; // marks an entity whose last row was not empty
    private final String view;
    private final long size;
    private final long slide;
    private transient MapState<String, TreeMap<Long, Long>> tiles;

    public TileWindowsSpike(String view, long size, long slide) {
        this.view = view;
        this.size = size;
        this.slide = slide;
    }

    @Override
    public void open(OpenContext context) {
        tiles = getRuntimeContext().getMapState(new MapStateDescriptor<>(
            "tiles", Types.STRING, TypeInformation.of(new TypeHint<TreeMap<Long, Long>>() {})));
    }

    @Override
    public void processElement(Row value, Context ctx, Collector<String> out) throws Exception {
        Row row = (Row) value.getField(1);
        if (!"T".equals(row.getField(0)) || row.getField(1) == null) {
            return; // side, read and closed rows: counted elsewhere in the real engine
        }
        String entity = (String) row.getField(1);
        long t = (Long) row.getField(2);
        long unique = (Long) row.getField(6);
        long bucket = t - Math.floorMod(t, slide);
        TreeMap<Long, Long> buckets = tiles.get(entity);
        if (buckets == null) {
            buckets = new TreeMap<>();
        }
        buckets.merge(bucket, unique, Long::sum);
        tiles.put(entity, buckets);
        ctx.timerService().registerEventTimeTimer(bucket + slide);
    }

    @Override
    public void onTimer(long end, OnTimerContext ctx, Collector<String> out) throws Exception {
        long now = System.currentTimeMillis();
        boolean again = false;
        Iterator<Map.Entry<String, TreeMap<Long, Long>>> entries = tiles.iterator();
        while (entries.hasNext()) {
            Map.Entry<String, TreeMap<Long, Long>> entry = entries.next();
            TreeMap<Long, Long> buckets = entry.getValue();
            boolean open = buckets.containsKey(OPEN);
            buckets.remove(OPEN);
            buckets.headMap(end - size).clear(); // in no window ending at or after end
            long count = 0;
            for (long n : buckets.headMap(end).values()) {
                count += n;
            }
            if (count > 0 || open) {
                out.collect(row(entry.getKey(), end, count, now));
            }
            if (buckets.isEmpty()) {
                entries.remove();
                continue;
            }
            if (count > 0) {
                buckets.put(OPEN, 1L);
                again = true; // the next end holds these tiles, or closes the window
            }
        }
        if (again) {
            ctx.timerService().registerEventTimeTimer(end + slide);
        }
    }

    private String row(String entity, long end, long count, long now) {
        StringBuilder json = new StringBuilder(160);
        json.append("{\"v\":1,\"view\":\"").append(view).append("\",\"entity_key\":\"")
            .append(entity).append("\",\"window_end_ms\":").append(end)
            .append(",\"values\":{\"events\":").append(count)
            .append("},\"emitted_at_ms\":").append(now).append('}');
        return json.toString();
    }
}
