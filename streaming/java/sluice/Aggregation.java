package sluice;

import java.io.IOException;
import java.util.HashSet;
import java.util.Iterator;
import java.util.List;
import java.util.Set;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.ObjectMapper;

/**
 * The aggregations of features/aggregations.py in the JVM, over the tile rows of
 * streaming/tiles.py: a tile's partial state read from its SQL columns ({@link #decode}), two
 * states merged ({@link #merge}, arguments unchanged, the older first) and a window's value
 * ({@link #result}; a null state, no values, gives the empty value). Every merge and result is
 * the Python one, operation for operation, so that a window assembled here is the window the
 * Python engine assembles from the same tiles (tests/integration/test_java_windows.py holds the
 * two equal on random tiles of every function).
 *
 * <p>States: count a Long; sum a double[] {total, error} (Neumaier); mean a Mean; min and max a
 * Double; last a Last (event time, then value: the greatest wins); stddev a Moments4 (n, c, d,
 * M2, Chan's merge); count_distinct a Set of the column's values. Nothing here changes a state
 * after it is built, so a window may share its tiles' states.
 */
public abstract class Aggregation implements java.io.Serializable {
    private static final ObjectMapper JSON = new ObjectMapper();
    private static final long LONG_MAX = Long.MAX_VALUE;
    private static final int LAST_TIME_DIGITS = 19;

    /** How many columns of a tile row the state takes (streaming/tiles.slot_widths). */
    public int width() {
        return 1;
    }

    /** The tile's state from its columns at {@code at}; null: the slot saw no value. */
    public abstract Object decode(List<Object> row, int at);

    public abstract Object merge(Object older, Object newer);

    public abstract Object result(Object state);

    /** Merge where either side may be null (no values). */
    public final Object mergeNullable(Object older, Object newer) {
        if (older == null) {
            return newer;
        }
        return newer == null ? older : merge(older, newer);
    }

    /** The merge of every tile's state at {@code slot}, oldest first (nulls: no values). */
    public Object fold(Iterable<Object[]> tiles, int slot) {
        Object merged = null;
        for (Object[] tile : tiles) {
            merged = mergeNullable(merged, tile[slot]);
        }
        return merged;
    }

    /** The aggregation of {@code function} over a column of {@code type} (FieldType values). */
    public static Aggregation of(String function, String type) {
        switch (function) {
            case "count":
                return new Count();
            case "sum":
                return new Sum();
            case "mean":
                return new MeanOf();
            case "min":
                return new Extreme(false);
            case "max":
                return new Extreme(true);
            case "last":
                return new LastOf(type);
            case "stddev":
                return new Stddev();
            case "count_distinct":
                return new Distinct(type);
            default:
                throw new IllegalArgumentException("aggregation " + function + " is unknown");
        }
    }

    static final class Count extends Aggregation {
        @Override
        public Object decode(List<Object> row, int at) {
            Long n = (Long) row.get(at);
            return n == null || n == 0 ? null : n;
        }

        @Override
        public Object merge(Object older, Object newer) {
            return (Long) older + (Long) newer;
        }

        @Override
        public Object result(Object state) {
            return state == null ? 0L : state;
        }
    }

    /** a + b, Neumaier's error term taken on the larger magnitude (_add_compensated). */
    static double[] addCompensated(double[] a, double[] b) {
        double total = a[0] + b[0];
        double error =
                Math.abs(a[0]) >= Math.abs(b[0]) ? (a[0] - total) + b[0] : (b[0] - total) + a[0];
        return new double[] {total, a[1] + b[1] + error};
    }

    static double compensatedValue(double[] state) {
        return Double.isFinite(state[0]) ? state[0] + state[1] : state[0];
    }

    /** sluice_sum's "hi lo" text (ExactSum.java) as the compensated state. */
    static double[] decodeSum(String text) {
        int space = text.indexOf(' ');
        return new double[] {
            Double.parseDouble(text.substring(0, space)), Double.parseDouble(text.substring(space + 1))
        };
    }

    /** sum and mean: a tile's state from (COUNT(x), sluice_sum(x)); null without values. */
    abstract static class CountedSum extends Aggregation {
        @Override
        public int width() {
            return 2;
        }

        @Override
        public Object decode(List<Object> row, int at) {
            Long n = (Long) row.get(at);
            return n == null || n == 0 ? null : state(n, decodeSum((String) row.get(at + 1)));
        }

        abstract Object state(long n, double[] sum);
    }

    static final class Sum extends CountedSum {
        @Override
        Object state(long n, double[] sum) {
            return sum;
        }

        @Override
        public Object merge(Object older, Object newer) {
            return addCompensated((double[]) older, (double[]) newer);
        }

        @Override
        public Object result(Object state) {
            return state == null ? 0.0 : compensatedValue((double[]) state);
        }
    }

    static final class Mean implements java.io.Serializable {
        final long n;
        final double[] sum;

        Mean(long n, double[] sum) {
            this.n = n;
            this.sum = sum;
        }
    }

    static final class MeanOf extends CountedSum {
        @Override
        Object state(long n, double[] sum) {
            return new Mean(n, sum);
        }

        @Override
        public Object merge(Object older, Object newer) {
            Mean a = (Mean) older;
            Mean b = (Mean) newer;
            return new Mean(a.n + b.n, addCompensated(a.sum, b.sum));
        }

        @Override
        public Object result(Object state) {
            if (state == null) {
                return null;
            }
            Mean mean = (Mean) state;
            return compensatedValue(mean.sum) / mean.n;
        }
    }

    /** min or max: Python's min/max keep the first of equals, which only -0.0 vs 0.0 tells. */
    static final class Extreme extends Aggregation {
        private final boolean max;

        Extreme(boolean max) {
            this.max = max;
        }

        @Override
        public Object decode(List<Object> row, int at) {
            return row.get(at);
        }

        @Override
        public Object merge(Object older, Object newer) {
            double a = (Double) older;
            double b = (Double) newer;
            // min(a, b) in Python is b only when b < a (max: b > a); NaN never compares.
            return (max ? b > a : b < a) ? newer : older;
        }

        @Override
        public Object result(Object state) {
            return state;
        }
    }

    /** last's state: the greatest (t, value), values compared as Python compares them. */
    static final class Last implements java.io.Serializable {
        final long t;
        final Object value;

        Last(long t, Object value) {
            this.t = t;
            this.value = value;
        }
    }

    @SuppressWarnings("unchecked")
    static int compareValues(Object a, Object b) {
        if (a instanceof String) {
            return compareCodePoints((String) a, (String) b);
        }
        return ((Comparable<Object>) a).compareTo(b);
    }

    /** Python's str order (code points), which String.compareTo (UTF-16 units) is not. */
    static int compareCodePoints(String a, String b) {
        int i = 0;
        int j = 0;
        while (i < a.length() && j < b.length()) {
            int x = a.codePointAt(i);
            int y = b.codePointAt(j);
            if (x != y) {
                return Integer.compare(x, y);
            }
            i += Character.charCount(x);
            j += Character.charCount(y);
        }
        return Boolean.compare(i < a.length(), j < b.length());
    }

    static final class LastOf extends Aggregation {
        private final String type;

        LastOf(String type) {
            this.type = type;
        }

        @Override
        public Object decode(List<Object> row, int at) {
            String encoded = (String) row.get(at);
            if (encoded == null) {
                return null;
            }
            long t = Long.parseLong(encoded.substring(0, LAST_TIME_DIGITS));
            String text = encoded.substring(LAST_TIME_DIGITS);
            switch (type) {
                case "string":
                    return new Last(t, text);
                case "bool":
                    return new Last(t, "TRUE".equals(text));
                default: // int, timestamp: "1" + 19 digits for x >= 0, else "0" + x + LONG_MAX
                    long number = Long.parseLong(text.substring(1));
                    return new Last(t, text.charAt(0) == '1' ? number : number - LONG_MAX);
            }
        }

        @Override
        public Object merge(Object older, Object newer) {
            Last a = (Last) older;
            Last b = (Last) newer;
            if (a.t != b.t) {
                return b.t > a.t ? b : a;
            }
            return compareValues(b.value, a.value) > 0 ? b : a;
        }

        @Override
        public Object result(Object state) {
            return state == null ? null : ((Last) state).value;
        }
    }

    /** The stddev state (n, c, d, M2) of features/aggregations.py. */
    static final class Moments4 implements java.io.Serializable {
        final long n;
        final double shift;
        final double offset;
        final double m2;

        Moments4(long n, double shift, double offset, double m2) {
            this.n = n;
            this.shift = shift;
            this.offset = offset;
            this.m2 = m2;
        }
    }

    static final class Stddev extends Aggregation {
        @Override
        public Object decode(List<Object> row, int at) {
            // Moments.java's "n c d m2" (Java's doubles: NaN and Infinity by name).
            String text = (String) row.get(at);
            if (text == null) {
                return null;
            }
            String[] parts = text.split(" ");
            if (parts.length != 4) {
                throw new IllegalStateException("unreadable stddev state " + text);
            }
            return new Moments4(
                    Long.parseLong(parts[0]),
                    Double.parseDouble(parts[1]),
                    Double.parseDouble(parts[2]),
                    Double.parseDouble(parts[3]));
        }

        @Override
        public Object merge(Object older, Object newer) {
            Moments4 a = (Moments4) older;
            Moments4 b = (Moments4) newer;
            long n = a.n + b.n;
            double delta = (b.shift - a.shift) + (b.offset - a.offset);
            // Python: na * nb / n divides two exact integers, rounding once.
            double weight = (double) (a.n * b.n) / n;
            return new Moments4(
                    n, a.shift, a.offset + delta * b.n / n, a.m2 + b.m2 + delta * delta * weight);
        }

        @Override
        public Object result(Object state) {
            if (state == null) {
                return null;
            }
            Moments4 m = (Moments4) state;
            return m.n >= 2 ? Math.sqrt(Math.max(m.m2, 0.0) / (m.n - 1)) : null;
        }
    }

    static final class Distinct extends Aggregation {
        private final String type;

        Distinct(String type) {
            this.type = type;
        }

        /** A value as a set of Python's holds it: one object per distinct Python value. */
        Object value(JsonNode node) {
            switch (type) {
                case "string":
                    return node.asText();
                case "bool":
                    return node.asBoolean();
                case "float":
                    double x = node.asDouble();
                    return x == 0.0 ? 0.0 : x; // -0.0 == 0.0 in Python's set
                default:
                    return node.asLong();
            }
        }

        @Override
        public Object decode(List<Object> row, int at) {
            String json = (String) row.get(at);
            if (json == null) {
                return null;
            }
            Set<Object> values = new HashSet<>();
            try {
                Iterator<JsonNode> items = JSON.readTree(json).elements();
                while (items.hasNext()) {
                    JsonNode item = items.next();
                    if (!item.isNull()) {
                        values.add(value(item));
                    }
                }
            } catch (IOException e) {
                throw new IllegalStateException("unreadable distinct values " + json, e);
            }
            return values.isEmpty() ? null : values;
        }

        @Override
        @SuppressWarnings("unchecked")
        public Object merge(Object older, Object newer) {
            Set<Object> union = new HashSet<>((Set<Object>) older);
            union.addAll((Set<Object>) newer);
            return union;
        }

        /** One union for the whole window: merge's copy per tile made a window of k tiles
         * copy its values k times (15% of the firings' samples in a profile of a 1M replay). */
        @Override
        @SuppressWarnings("unchecked")
        public Object fold(Iterable<Object[]> tiles, int slot) {
            Set<Object> first = null;
            Set<Object> union = null;
            for (Object[] tile : tiles) {
                Set<Object> values = (Set<Object>) tile[slot];
                if (values == null) {
                    continue;
                }
                if (first == null) {
                    first = values; // shared with the tile, never changed: no copy for one
                } else {
                    if (union == null) {
                        union = new HashSet<>(first);
                    }
                    union.addAll(values);
                }
            }
            return union != null ? union : first;
        }

        @Override
        @SuppressWarnings("unchecked")
        public Object result(Object state) {
            return state == null ? 0L : (long) ((Set<Object>) state).size();
        }
    }
}
