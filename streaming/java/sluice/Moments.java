package sluice;

import org.apache.flink.table.annotation.DataTypeHint;
import org.apache.flink.table.functions.AggregateFunction;
import org.apache.flink.types.Row;

/**
 * The stddev partial state of features/aggregations.py (Stddev), in the JVM: (n, c, d, M2),
 * the mean held as c + d with c the first value, Welford's update per value and Chan et al.'s
 * merge, the same arithmetic as the Python class, so a tile's state is what the reference
 * would fold. Null values are skipped. Compiled by streaming/udf.py at job build.
 */
@DataTypeHint("ROW<n BIGINT, c DOUBLE, d DOUBLE, m2 DOUBLE>")
public class Moments extends AggregateFunction<Row, Moments.Acc> {

    /** The accumulator: a POJO, so Flink serializes it field by field into state. */
    public static class Acc {
        public long n;
        public double c;
        public double d;
        public double m2;
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
        if (acc.n == 0) {
            acc.n = 1;
            acc.c = x;
            acc.d = 0.0;
            acc.m2 = 0.0;
            return;
        }
        acc.n += 1;
        double y = x - acc.c;
        double delta = y - acc.d;
        acc.d += delta / acc.n;
        acc.m2 += delta * (y - acc.d);
    }

    public void merge(Acc acc, Iterable<Acc> others) {
        for (Acc b : others) {
            if (b.n == 0) {
                continue;
            }
            if (acc.n == 0) {
                acc.n = b.n;
                acc.c = b.c;
                acc.d = b.d;
                acc.m2 = b.m2;
                continue;
            }
            long n = acc.n + b.n;
            double delta = (b.c - acc.c) + (b.d - acc.d);
            double na = acc.n;
            double nb = b.n;
            acc.d = acc.d + delta * nb / n;
            acc.m2 = acc.m2 + b.m2 + delta * delta * (na * nb / n);
            acc.n = n;
        }
    }

    @Override
    public Row getValue(Acc acc) {
        if (acc.n == 0) {
            return null;
        }
        return Row.of(acc.n, acc.c, acc.d, acc.m2);
    }
}
