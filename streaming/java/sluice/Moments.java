package sluice;

import java.math.BigDecimal;
import java.math.MathContext;
import org.apache.flink.table.annotation.DataTypeHint;
import org.apache.flink.table.functions.AggregateFunction;
import org.apache.flink.types.Row;

/**
 * The stddev partial state of features/aggregations.py (Stddev), in the JVM: (n, c, d, M2), the
 * mean held as c + d and M2 the sum of squared deviations from it, which the Python side merges
 * with Chan et al.'s formula. Computed from exact sums: every double is exactly a decimal, so
 * the BigDecimal sum of the values and of their squares are exact, M2 = (n Q - S^2) / n has no
 * cancellation (the numerator is exact), and the state depends only on the set of values, not
 * on the order they arrive in nor on how partial states were grouped and merged (a window
 * aggregate's local/global phases and a cascaded window's timer order vary between runs, so a
 * tile folded with Welford's update could differ in its last bits after a restore, and a
 * replayed row differ from the one emitted before). c is the mean rounded to a double, d the
 * rest of the mean (to 34 digits); c + d and M2 are as close to the truth as doubles allow,
 * closer than a per-value update. Null values are skipped; infinite or NaN values (ingest
 * rejects them) make c and M2 NaN. Compiled by streaming/udf.py at job build.
 */
@DataTypeHint("ROW<n BIGINT, c DOUBLE, d DOUBLE, m2 DOUBLE>")
public class Moments extends AggregateFunction<Row, Moments.Acc> {

    /** The accumulator: count, exact sum and exact sum of squares (RAW: any precision). */
    public static class Acc {
        public long n;
        public @DataTypeHint(value = "RAW", bridgedTo = BigDecimal.class) BigDecimal sum =
                BigDecimal.ZERO;
        public @DataTypeHint(value = "RAW", bridgedTo = BigDecimal.class) BigDecimal squares =
                BigDecimal.ZERO;
        public boolean nonFinite;
    }

    @Override
    public Acc createAccumulator() {
        return new Acc();
    }

    public void accumulate(Acc acc, Double value) {
        if (value == null) {
            return;
        }
        double x = value;
        acc.n += 1;
        if (!Double.isFinite(x)) {
            acc.nonFinite = true;
            return;
        }
        BigDecimal exact = new BigDecimal(x);
        acc.sum = acc.sum.add(exact);
        acc.squares = acc.squares.add(exact.multiply(exact));
    }

    public void merge(Acc acc, Iterable<Acc> others) {
        for (Acc b : others) {
            acc.n += b.n;
            acc.sum = acc.sum.add(b.sum);
            acc.squares = acc.squares.add(b.squares);
            acc.nonFinite |= b.nonFinite;
        }
    }

    @Override
    public Row getValue(Acc acc) {
        if (acc.n == 0) {
            return null;
        }
        if (acc.nonFinite) {
            return Row.of(acc.n, Double.NaN, 0.0, Double.NaN);
        }
        BigDecimal n = BigDecimal.valueOf(acc.n);
        BigDecimal mean = acc.sum.divide(n, MathContext.DECIMAL128);
        double c = mean.doubleValue();
        double d = mean.subtract(new BigDecimal(c)).doubleValue();
        BigDecimal m2 =
                acc.squares
                        .multiply(n)
                        .subtract(acc.sum.multiply(acc.sum))
                        .divide(n, MathContext.DECIMAL128);
        return Row.of(acc.n, c, d, m2.doubleValue());
    }
}
