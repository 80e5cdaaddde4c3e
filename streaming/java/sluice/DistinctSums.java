package sluice;

import org.apache.flink.table.annotation.DataTypeHint;
import org.apache.flink.table.functions.AggregateFunction;

/**
 * A tile's partial states that a repeated event would change, over its distinct events: how many
 * there are, and the sums (ExactSum) and moments (Moments) of the slots that need them. The tile
 * query (streaming/tiles.py) runs it in the one window aggregation per (entity, slide bucket,
 * partition), where a first aggregation per event id (one row per distinct event, with its state
 * and timer in Flink's keyed state) used to deduplicate: that aggregation cost more than the rest
 * of the query at a live stream's density (many events per tile). Min, max, last and
 * count_distinct stay plain SQL aggregates over every copy: a repeat, byte for byte the same
 * record, does not change them.
 *
 * <p>Arguments: the slots' kinds, one letter per value that follows ('s' a sum: count and exact
 * sum; 'm' moments), the event id (sluice_event_id: 16 bytes; shorter ids, up to 15 bytes, are
 * the query's stand-in for events its filter drops), and the values. An id seen before in the
 * tile adds nothing. Result: text, fields split by ';': the distinct events, then per 's' its
 * count of values and ExactSum's "hi lo" (empty with no value), per 'm' Moments' "n c d m2"
 * (empty with no value). The ids are kept until the tile's window fires (the window operator
 * drops the accumulator then): the state is the open tiles' distinct events, as the first
 * aggregation's was. No merge: a merge of two tiles' parts could not take a repeat out of both;
 * the query runs its aggregations in one phase (tiles.TABLE_CONFIG), which needs none.
 */
public class DistinctSums extends AggregateFunction<String, DistinctSums.Acc> {

    /** The accumulator: its state a RAW field, mutated in place. */
    public static class Acc {
        public @DataTypeHint(value = "RAW", bridgedTo = State.class) State state = new State();
    }

    /** The ids seen and the slots' states (ExactSum.Acc or Moments.Acc, by kind). */
    public static class State {
        public long events;
        public EventIds ids = new EventIds();
        public Object[] slots;
    }

    @Override
    public Acc createAccumulator() {
        return new Acc();
    }

    public void accumulate(Acc acc, String kinds, byte[] id, Double... values) {
        State state = acc.state;
        if (state.slots == null) {
            state.slots = slots(kinds, values.length);
        }
        if (!state.ids.add(id)) {
            return;
        }
        state.events += 1;
        for (int i = 0; i < values.length; i++) {
            Object slot = state.slots[i];
            if (slot instanceof ExactSum.Acc) {
                ExactSum.add((ExactSum.Acc) slot, values[i]);
            } else {
                Moments.add((Moments.Acc) slot, values[i]);
            }
        }
    }

    private static Object[] slots(String kinds, int n) {
        if (kinds.length() != n) {
            throw new IllegalArgumentException(
                    "sluice_distinct_sums: " + kinds.length() + " kinds for " + n + " values");
        }
        Object[] slots = new Object[n];
        for (int i = 0; i < n; i++) {
            char kind = kinds.charAt(i);
            if (kind == 's') {
                slots[i] = new ExactSum.Acc();
            } else if (kind == 'm') {
                slots[i] = new Moments.Acc();
            } else {
                throw new IllegalArgumentException("sluice_distinct_sums: unknown kind " + kind);
            }
        }
        return slots;
    }

    @Override
    public String getValue(Acc acc) {
        State state = acc.state;
        StringBuilder text = new StringBuilder().append(state.events);
        for (Object slot : state.slots == null ? new Object[0] : state.slots) {
            text.append(';');
            if (slot instanceof ExactSum.Acc) {
                ExactSum.Acc sum = (ExactSum.Acc) slot;
                text.append(sum.n).append(';');
                String value = ExactSum.text(sum);
                text.append(value == null ? "" : value);
            } else {
                String value = Moments.text((Moments.Acc) slot);
                text.append(value == null ? "" : value);
            }
        }
        return text.toString();
    }

    /**
     * A set of event ids as pairs of longs, open addressing with linear probing (no object per
     * id: a tile at a live stream's density holds thousands). The pair (0, 0) is kept apart.
     */
    public static class EventIds {
        // Pairs: 4 slots to start with, a tile of a backlog's replay holding one event or two.
        public long[] table = new long[8];
        public int size;
        public boolean zero;

        /** True when the id was not in the set (it is now). */
        boolean add(byte[] id) {
            long hi;
            long lo;
            if (id.length == 16) {
                hi = EventId.getLong(id, 0);
                lo = EventId.getLong(id, 8);
            } else if (id.length < 16) {
                // The length in the top byte: distinct from every other short id.
                hi = (long) id.length << 56;
                lo = 0;
                for (int i = 0; i < id.length; i++) {
                    if (i < 7) {
                        hi |= (id[i] & 0xffL) << (8 * i);
                    } else {
                        lo |= (id[i] & 0xffL) << (8 * (i - 7));
                    }
                }
            } else {
                throw new IllegalArgumentException("an event id of " + id.length + " bytes");
            }
            if (hi == 0 && lo == 0) {
                boolean added = !zero;
                zero = true;
                return added;
            }
            if (2 * (size + 1) > table.length / 2) {
                grow();
            }
            return insert(table, hi, lo);
        }

        private boolean insert(long[] into, long hi, long lo) {
            int mask = into.length / 2 - 1;
            int at = (int) (mix(hi ^ lo) & mask);
            while (true) {
                long h = into[2 * at];
                long l = into[2 * at + 1];
                if (h == 0 && l == 0) {
                    into[2 * at] = hi;
                    into[2 * at + 1] = lo;
                    size += into == table ? 1 : 0;
                    return true;
                }
                if (h == hi && l == lo) {
                    return false;
                }
                at = (at + 1) & mask;
            }
        }

        private void grow() {
            long[] old = table;
            long[] bigger = new long[old.length * 2];
            for (int i = 0; i < old.length; i += 2) {
                if (old[i] != 0 || old[i + 1] != 0) {
                    insert(bigger, old[i], old[i + 1]);
                }
            }
            table = bigger;
        }

        private static long mix(long x) {
            x ^= x >>> 33;
            x *= 0xff51afd7ed558ccdL;
            x ^= x >>> 33;
            return x;
        }
    }
}
