package sluice;

import java.math.BigInteger;
import org.apache.flink.table.annotation.DataTypeHint;
import org.apache.flink.table.functions.AggregateFunction;

/**
 * The sum of a column's doubles, exact and therefore independent of the order in which values
 * arrive and of how partial sums are grouped and merged: Flink SQL's SUM(DOUBLE) rounds after
 * every addition, and the order it adds in is not fixed. A window aggregate runs in two phases
 * (a local pre-aggregation whose buffers flush at watermarks and checkpoint barriers, merged by
 * a global one) and a cascaded window emits its rows in the order of its timer queue, so the
 * same tile summed twice (a replay after a restore) could differ in its last bits, and a row
 * emitted again with other values. Each double is an integer times a power of two, so their
 * BinarySum is the exact sum.
 *
 * <p>Result: the text "hi lo", two doubles as Java prints them (round-trip exact): hi the exact
 * sum rounded to the nearest double (what math.fsum returns), lo the rest rounded, so that hi +
 * lo is features/aggregations.py's compensated sum state (total, error). Null when no value was
 * seen. Infinite or NaN values (ingest rejects them; only input that bypassed it has them) are
 * summed apart in double arithmetic, which is order-independent for them, and win: "inf 0.0".
 * Compiled by streaming/udf.py at job build.
 */
public class ExactSum extends AggregateFunction<String, ExactSum.Acc> {

    /** The accumulator: the exact sum (a RAW field), the count. */
    public static class Acc {
        public @DataTypeHint(value = "RAW", bridgedTo = BinarySum.class) BinarySum sum =
                new BinarySum();
        public long n;
        public double nonFinite;
    }

    @Override
    public Acc createAccumulator() {
        return new Acc();
    }

    public void accumulate(Acc acc, Double value) {
        add(acc, value);
    }

    static void add(Acc acc, Double value) {
        if (value == null) {
            return;
        }
        double x = value;
        acc.n += 1;
        if (Double.isFinite(x)) {
            acc.sum.add(x);
        } else {
            acc.nonFinite += x;
        }
    }

    public void merge(Acc acc, Iterable<Acc> others) {
        for (Acc b : others) {
            acc.n += b.n;
            acc.sum.add(b.sum);
            acc.nonFinite += b.nonFinite;
        }
    }

    @Override
    public String getValue(Acc acc) {
        return text(acc);
    }

    static String text(Acc acc) {
        if (acc.n == 0) {
            return null;
        }
        if (acc.nonFinite != 0.0 || Double.isNaN(acc.nonFinite)) {
            return acc.nonFinite + " 0.0";
        }
        return split(acc.sum);
    }

    /** "hi lo" of an exact value: hi the nearest double, lo the rest's nearest double. */
    static String split(BinarySum exact) {
        double hi = exact.value();
        if (!Double.isFinite(hi)) {
            return hi + " 0.0";
        }
        BinarySum high = BinarySum.of(hi);
        int to = BinarySum.least(exact, high);
        double lo = BinarySum.round(exact.at(to).subtract(high.at(to)), BigInteger.ONE, to);
        return hi + " " + lo;
    }
}
