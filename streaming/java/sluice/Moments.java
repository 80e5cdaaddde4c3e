package sluice;

import java.math.BigInteger;
import org.apache.flink.table.annotation.DataTypeHint;
import org.apache.flink.table.functions.AggregateFunction;

/**
 * The stddev partial state of features/aggregations.py (Stddev), in the JVM: (n, c, d, M2), the
 * mean held as c + d and M2 the sum of squared deviations from it, which the Python side merges
 * with Chan et al.'s formula. Computed from exact sums (BinarySum: every double is an integer
 * times a power of two): the sum S of the values and Q of their squares are exact, M2 = (n Q -
 * S^2) / n has an exact numerator, and the state depends only on the set of values, not on the
 * order they arrive in nor on how partial states were grouped and merged (a window aggregate's
 * local/global phases and a cascaded window's timer order vary between runs, so a tile folded
 * with Welford's update could differ in its last bits after a restore, and a replayed row differ
 * from the one emitted before). c is the exact mean rounded to a double, d the exact rest
 * rounded, M2 the exact value rounded: each as close to the truth as a double allows. Null
 * values are skipped; infinite or NaN values (ingest rejects them) make c and M2 NaN.
 *
 * <p>Result: the text "n c d m2" (Java's doubles, round-trip exact; NaN by name), read by
 * streaming/tiles.py's decode_moments and Aggregation.Stddev. Text, not a ROW turned into JSON
 * by JSON_STRING: that serialization was a tenth of the window aggregation's thread, and its
 * parse half of the Java window assembly's decode. Compiled by streaming/udf.py at job build.
 */
public class Moments extends AggregateFunction<String, Moments.Acc> {

    /** The accumulator: count, exact sum and exact sum of squares (RAW fields). */
    public static class Acc {
        public long n;
        public @DataTypeHint(value = "RAW", bridgedTo = BinarySum.class) BinarySum sum =
                new BinarySum();
        public @DataTypeHint(value = "RAW", bridgedTo = BinarySum.class) BinarySum squares =
                new BinarySum();
        public boolean nonFinite;
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
        if (!Double.isFinite(x)) {
            acc.nonFinite = true;
            return;
        }
        // x decomposed once (m * 2^e), for the sum and for its exact square.
        BinarySum one = BinarySum.of(x);
        acc.sum.add(one);
        acc.squares.add(one.m.multiply(one.m), 2 * one.exp);
    }

    public void merge(Acc acc, Iterable<Acc> others) {
        for (Acc b : others) {
            acc.n += b.n;
            acc.sum.add(b.sum);
            acc.squares.add(b.squares);
            acc.nonFinite |= b.nonFinite;
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
        if (acc.nonFinite) {
            return acc.n + " NaN 0.0 NaN";
        }
        BigInteger n = BigInteger.valueOf(acc.n);
        BinarySum s = acc.sum;
        double c = BinarySum.round(s.m, n, s.exp);
        // d: (S - n c) / n, over the least exponent of S and c.
        BinarySum mean = BinarySum.of(c);
        int to = BinarySum.least(s, mean);
        double d = BinarySum.round(s.at(to).subtract(mean.at(to).multiply(n)), n, to);
        // M2: (n Q - S^2) / n, S^2 = s^2 * 2^(2 exp).
        BinarySum square = new BinarySum();
        square.add(s.m.multiply(s.m), 2 * s.exp);
        int at = BinarySum.least(acc.squares, square);
        BigInteger m2 = acc.squares.at(at).multiply(n).subtract(square.at(at));
        return acc.n + " " + c + " " + d + " " + BinarySum.round(m2, n, at);
    }
}
