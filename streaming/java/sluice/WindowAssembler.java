package sluice;

import java.io.IOException;
import java.io.Serializable;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.NavigableMap;
import java.util.TreeMap;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.ObjectMapper;

/**
 * One view's windows assembled from tiles, in the JVM: streaming/windows.py's WindowEngine
 * (add_tile, fire, next_timer, values_at and the WindowQueue of long windows) ported operation
 * for operation, so that the rows are the rows the Python engine emits from the same tiles
 * (tests/integration/test_java_windows.py). Read windows.py's docstring for the semantics:
 * every end up to the watermark is final; a row while the largest window holds a tile; one
 * closing row of empty values when it stops holding any; a quiet key's row reuses the values
 * of the row before when no tile entered or left any window.
 *
 * <p>The view comes as JSON (streaming/java_windows.py writes it from the CompiledView): its
 * slide, its window sizes in order, one slot per partial state (function, column type) and
 * one spec per feature (name, slot, window size).
 */
public final class WindowAssembler implements Serializable {
    /** An entity's next end before its first firing (Python's None). */
    public static final long NONE = Long.MIN_VALUE;
    /** Windows of more tiles than this are assembled by a queue (windows.QUEUE_FROM_TILES). */
    static final long QUEUE_FROM_TILES = 240;

    /** Where the rows of a firing go, oldest first per entity. */
    public interface Rows {
        void row(long end, Object[] values) throws Exception;
    }

    /** One entity's state: the first end not final yet, and its tiles by bucket. */
    public static final class EntityWindows implements Serializable {
        public long nextEnd = NONE;
        public TreeMap<Long, Object[]> tiles = new TreeMap<>();
        /** Per long window size: its queue, a cache rebuilt from the tiles when absent. */
        public transient Map<Long, WindowQueue> queues;
    }

    public final String view;
    public final long slide;
    public final long largest;
    final long[] sizes;
    final Aggregation[] slots;
    final int[] slotColumns; // where each slot's columns start in a tile row's state columns
    public final String[] names;
    final int[] specSlot;
    final long[] specWindow;
    final Object[] empty;

    public WindowAssembler(String viewJson) {
        JsonNode view;
        try {
            view = new ObjectMapper().readTree(viewJson);
        } catch (IOException e) {
            throw new IllegalArgumentException("unreadable view plan: " + viewJson, e);
        }
        this.view = view.get("view").asText();
        this.slide = view.get("slide").asLong();
        JsonNode sizeNodes = view.get("sizes");
        sizes = new long[sizeNodes.size()];
        long max = 0;
        for (int i = 0; i < sizes.length; i++) {
            sizes[i] = sizeNodes.get(i).asLong();
            max = Math.max(max, sizes[i]);
        }
        largest = max;
        JsonNode slotNodes = view.get("slots");
        slots = new Aggregation[slotNodes.size()];
        slotColumns = new int[slots.length];
        int at = 0;
        for (int i = 0; i < slots.length; i++) {
            JsonNode slot = slotNodes.get(i);
            slots[i] = Aggregation.of(slot.get("function").asText(), slot.path("type").asText());
            slotColumns[i] = at;
            at += slots[i].width();
        }
        JsonNode specNodes = view.get("specs");
        names = new String[specNodes.size()];
        specSlot = new int[names.length];
        specWindow = new long[names.length];
        empty = new Object[names.length];
        for (int i = 0; i < names.length; i++) {
            JsonNode spec = specNodes.get(i);
            names[i] = spec.get("name").asText();
            specSlot[i] = spec.get("slot").asInt();
            specWindow[i] = spec.get("window").asLong();
            empty[i] = slots[specSlot[i]].result(null);
        }
    }

    /** A tile's partial states, one per slot, from a tile row's state columns (from ``at``). */
    public Object[] decode(List<Object> row, int at) {
        Object[] states = new Object[slots.length];
        for (int i = 0; i < slots.length; i++) {
            states[i] = slots[i].decode(row, at + slotColumns[i]);
        }
        return states;
    }

    /** Merge a tile's states into the entity's tile of ``bucket``; true when the tile is new. */
    public boolean addTile(EntityWindows state, long bucket, Object[] states) {
        if (state.nextEnd != NONE && bucket + slide < state.nextEnd) {
            throw new IllegalStateException(
                    "view " + view + ": a tile of bucket " + bucket
                            + " reached the window state after its window end "
                            + (bucket + slide) + " was emitted");
        }
        Object[] tile = state.tiles.get(bucket);
        if (tile == null) {
            state.tiles.put(bucket, states);
            return true;
        }
        Object[] merged = tile.clone(); // states are never changed in place: queues share them
        for (int i = 0; i < slots.length; i++) {
            merged[i] = slots[i].mergeNullable(tile[i], states[i]);
        }
        // Only an open tile merges more (its end is not fired yet), and queues hold fired
        // windows' tiles only: no queue holds it.
        state.tiles.put(bucket, merged);
        return false;
    }

    /** The next end with a row or a closing row due; NONE when the entity has no tiles. */
    public long nextTimer(EntityWindows state) {
        if (state.tiles.isEmpty()) {
            return NONE;
        }
        long first = state.tiles.firstKey() + slide;
        return state.nextEnd == NONE ? first : Math.max(state.nextEnd, first);
    }

    /** Emit the rows of every end up to ``upto`` not emitted yet, oldest first; evict tiles
     * in no window any more (WindowEngine.fire). Returns how many rows were emitted. */
    public int fire(EntityWindows state, long upto, Rows out) throws Exception {
        TreeMap<Long, Object[]> tiles = state.tiles;
        long ts = upto - Math.floorMod(upto, slide);
        int rows = 0;
        long lastRowEnd = NONE;
        Object[] previous = null;
        if (!tiles.isEmpty()) {
            long first = tiles.firstKey();
            long end = state.nextEnd == NONE ? first + slide : Math.max(state.nextEnd, first + slide);
            while (!tiles.isEmpty() && end <= ts) {
                Long inWindow = tiles.ceilingKey(end - largest);
                if (inWindow != null && inWindow < end) {
                    if (previous != null && lastRowEnd == end - slide && unchanged(tiles, end)) {
                        out.row(end, previous); // a quiet key's row: the same values
                    } else {
                        previous = valuesAt(state, end);
                        out.row(end, previous);
                    }
                    rows++;
                    lastRowEnd = end;
                } else if (tiles.firstKey() == end - largest - slide) {
                    previous = null;
                    out.row(end, empty.clone());
                    rows++;
                    lastRowEnd = end;
                }
                // Bucket end - largest stays: the closing check at end + slide looks at it.
                tiles.headMap(end - largest, false).clear();
                if (!tiles.isEmpty()) {
                    end = Math.max(end + slide, tiles.firstKey() + slide);
                }
            }
        }
        state.nextEnd = state.nextEnd == NONE ? ts + slide : Math.max(state.nextEnd, ts + slide);
        return rows;
    }

    /** No tile entered a window (bucket end - slide) or left one (end - size - slide) since
     * the row at end - slide. */
    private boolean unchanged(TreeMap<Long, Object[]> tiles, long end) {
        if (tiles.containsKey(end - slide)) {
            return false;
        }
        for (long size : sizes) {
            if (tiles.containsKey(end - size - slide)) {
                return false;
            }
        }
        return true;
    }

    /** Every feature of the row at ``end``, each over its own window's tiles. */
    Object[] valuesAt(EntityWindows state, long end) {
        Object[] out = new Object[names.length];
        for (long size : sizes) {
            NavigableMap<Long, Object[]> window = state.tiles.subMap(end - size, true, end, false);
            if (size > QUEUE_FROM_TILES * slide) {
                if (state.queues == null) {
                    state.queues = new HashMap<>();
                }
                WindowQueue queue = state.queues.computeIfAbsent(size, s -> new WindowQueue(this, s));
                queue.values(state.tiles, end - size, end, out);
                continue;
            }
            // Walked once per size, not once per feature (a tree map's iterator each time; and
            // not by ArrayList(collection): a sub-map's toArray walks it twice, for its size).
            List<Object[]> tiles = new ArrayList<>();
            for (Object[] tile : window.values()) {
                tiles.add(tile);
            }
            for (int spec = 0; spec < names.length; spec++) {
                if (specWindow[spec] != size) {
                    continue;
                }
                int slot = specSlot[spec];
                Aggregation aggregation = slots[slot];
                out[spec] = aggregation.result(aggregation.fold(tiles, slot));
            }
        }
        return out;
    }

    /**
     * One window size's tiles of one entity as a two-stacks sliding aggregate (windows.py's
     * WindowQueue): the newer stack keeps one running merge per spec, the older stack each of
     * its tiles merged with every newer tile of it. count_distinct keeps a count per value.
     */
    static final class WindowQueue {
        private final WindowAssembler plan;
        private final long size;
        private final int[] specs; // the specs of this size
        private final boolean[] distinct;
        private final ArrayList<Object[]> older = new ArrayList<>(); // [bucket, merged[], tile]
        private final ArrayList<long[]> newerBuckets = new ArrayList<>();
        private final ArrayList<Object[]> newerTiles = new ArrayList<>();
        private Object[] newerMerged;
        private List<Map<Object, Integer>> counts;
        private long last = NONE;
        private long[] content;
        private Object[] values;

        WindowQueue(WindowAssembler plan, long size) {
            this.plan = plan;
            this.size = size;
            int n = 0;
            for (long w : plan.specWindow) {
                n += w == size ? 1 : 0;
            }
            specs = new int[n];
            distinct = new boolean[n];
            n = 0;
            for (int spec = 0; spec < plan.names.length; spec++) {
                if (plan.specWindow[spec] == size) {
                    specs[n] = spec;
                    distinct[n] = plan.slots[plan.specSlot[spec]] instanceof Aggregation.Distinct;
                    n++;
                }
            }
            reset();
        }

        private void reset() {
            older.clear();
            newerBuckets.clear();
            newerTiles.clear();
            newerMerged = new Object[specs.length];
            counts = new ArrayList<>();
            for (int i = 0; i < specs.length; i++) {
                counts.add(distinct[i] ? new HashMap<>() : null);
            }
            last = NONE;
            content = null;
            values = null;
        }

        private Object state(Object[] tile, int i) {
            return tile[plan.specSlot[specs[i]]];
        }

        private Aggregation aggregation(int i) {
            return plan.slots[plan.specSlot[specs[i]]];
        }

        void values(TreeMap<Long, Object[]> tiles, long start, long end, Object[] out) {
            if (last != NONE && last >= end) {
                reset();
            }
            NavigableMap<Long, Object[]> entering =
                    last == NONE
                            ? tiles.subMap(start, true, end, false)
                            : tiles.subMap(Math.max(start, last), last < start, end, false);
            for (Map.Entry<Long, Object[]> entry : entering.entrySet()) {
                push(entry.getKey(), entry.getValue());
            }
            evict(start);
            long[] now = {oldest(), last, older.size() + newerTiles.size()};
            if (values == null || !java.util.Arrays.equals(now, content)) {
                values = new Object[specs.length];
                Object[] top = older.isEmpty() ? null : (Object[]) older.get(older.size() - 1)[1];
                for (int i = 0; i < specs.length; i++) {
                    if (distinct[i]) {
                        values[i] = (long) counts.get(i).size();
                    } else {
                        Object olderState = top == null ? null : top[i];
                        values[i] =
                                aggregation(i).result(aggregation(i).mergeNullable(olderState, newerMerged[i]));
                    }
                }
                content = now;
            }
            for (int i = 0; i < specs.length; i++) {
                out[specs[i]] = values[i];
            }
        }

        private long oldest() {
            if (!older.isEmpty()) {
                return (Long) older.get(older.size() - 1)[0];
            }
            return newerBuckets.isEmpty() ? NONE : newerBuckets.get(0)[0];
        }

        @SuppressWarnings("unchecked")
        private void push(long bucket, Object[] tile) {
            last = bucket;
            newerBuckets.add(new long[] {bucket});
            newerTiles.add(tile);
            for (int i = 0; i < specs.length; i++) {
                Object s = state(tile, i);
                if (distinct[i]) {
                    if (s != null) {
                        for (Object value : (java.util.Set<Object>) s) {
                            counts.get(i).merge(value, 1, Integer::sum);
                        }
                    }
                } else {
                    newerMerged[i] = aggregation(i).mergeNullable(newerMerged[i], s);
                }
            }
        }

        @SuppressWarnings("unchecked")
        private void evict(long start) {
            while (true) {
                if (older.isEmpty()) {
                    if (newerTiles.isEmpty() || newerBuckets.get(0)[0] >= start) {
                        return;
                    }
                    flip();
                }
                Object[] top = older.get(older.size() - 1);
                if ((Long) top[0] >= start) {
                    return;
                }
                older.remove(older.size() - 1);
                Object[] tile = (Object[]) top[2];
                for (int i = 0; i < specs.length; i++) {
                    Object s = state(tile, i);
                    if (distinct[i] && s != null) {
                        Map<Object, Integer> count = counts.get(i);
                        for (Object value : (java.util.Set<Object>) s) {
                            Integer left = count.get(value);
                            if (left == null || left <= 1) {
                                count.remove(value);
                            } else {
                                count.put(value, left - 1);
                            }
                        }
                    }
                }
            }
        }

        private void flip() {
            Object[] running = new Object[specs.length];
            for (int k = newerTiles.size() - 1; k >= 0; k--) {
                Object[] tile = newerTiles.get(k);
                Object[] merged = new Object[specs.length];
                for (int i = 0; i < specs.length; i++) {
                    if (!distinct[i]) {
                        merged[i] = aggregation(i).mergeNullable(state(tile, i), running[i]);
                    }
                }
                running = merged;
                older.add(new Object[] {newerBuckets.get(k)[0], merged, tile});
            }
            newerBuckets.clear();
            newerTiles.clear();
            newerMerged = new Object[specs.length];
        }
    }
}
