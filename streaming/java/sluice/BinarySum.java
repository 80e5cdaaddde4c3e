package sluice;

import java.io.Serializable;
import java.math.BigInteger;

/**
 * An exact sum of doubles in binary: m * 2^exp, m an integer, exp the least exponent added.
 * Every finite double is an integer times a power of two, so the sum is exact and so depends
 * only on the values added, not on their order nor on how partial sums were merged.
 *
 * <p>Why not BigDecimal (as before plan 7): a double's decimal expansion has as many digits as
 * its binary exponent is negative (7.8 is 51 digits), adding aligns decimal scales, and JDK 17's
 * BigDecimal.doubleValue() prints and parses the number. Measured in the tile engine's window
 * aggregation (async-profiler, a 1M-event run): the sums' and moments' BigDecimal work was about
 * a third of the thread that bounds the job. Here the numbers stay as wide as the values' bits
 * span, and {@link #round} rounds a quotient once, correctly.
 */
public final class BinarySum implements Serializable {
    private static final long serialVersionUID = 1L;
    static final int MIN_EXPONENT = -1074; // of the least subnormal double

    public BigInteger m = BigInteger.ZERO;
    public int exp = 0; // meaningless while m is zero

    /** Adds the finite double x. */
    public void add(double x) {
        long bits = Double.doubleToRawLongBits(x);
        int biased = (int) ((bits >>> 52) & 0x7ff);
        long mantissa = bits & ((1L << 52) - 1);
        int e = MIN_EXPONENT;
        if (biased != 0) {
            mantissa |= 1L << 52;
            e = biased - 1075;
        }
        if (mantissa == 0) {
            return; // a zero adds nothing
        }
        int zeros = Long.numberOfTrailingZeros(mantissa);
        mantissa >>= zeros;
        add(BigInteger.valueOf(bits < 0 ? -mantissa : mantissa), e + zeros);
    }

    /** Adds v * 2^e. */
    public void add(BigInteger v, int e) {
        if (v.signum() == 0) {
            return;
        }
        if (m.signum() == 0) {
            m = v;
            exp = e;
        } else if (e >= exp) {
            m = m.add(v.shiftLeft(e - exp));
        } else {
            m = m.shiftLeft(exp - e).add(v);
            exp = e;
        }
    }

    public void add(BinarySum other) {
        add(other.m, other.exp);
    }

    /** m * 2^(exp - to): the value as an integer multiple of 2^to (to <= exp, or m zero). */
    BigInteger at(int to) {
        return m.signum() == 0 ? BigInteger.ZERO : m.shiftLeft(exp - to);
    }

    /** The least exponent of these values that are not zero (0 when all are zero). */
    static int least(BinarySum... values) {
        int e = Integer.MAX_VALUE;
        for (BinarySum v : values) {
            if (v.m.signum() != 0) {
                e = Math.min(e, v.exp);
            }
        }
        return e == Integer.MAX_VALUE ? 0 : e;
    }

    /** The double x exactly, as a BinarySum. */
    static BinarySum of(double x) {
        BinarySum exact = new BinarySum();
        exact.add(x);
        return exact;
    }

    /** The value rounded to the nearest double (ties to even; beyond the range: infinite). */
    public double value() {
        return round(m, BigInteger.ONE, exp);
    }

    /**
     * num / den * 2^exp rounded once to the nearest double, ties to even (den > 0): the
     * quotient is taken to at least 55 bits, with a sticky bit for a remainder, so that
     * BigInteger.doubleValue's own correct rounding is the rounding of the exact value; the
     * power of two is then exact unless the result is subnormal, which is rounded at 2^-1074
     * directly.
     */
    static double round(BigInteger num, BigInteger den, int exp) {
        if (num.signum() == 0) {
            return 0.0;
        }
        BigInteger a = num.abs();
        int shift = 55 - (a.bitLength() - den.bitLength());
        BigInteger[] qr =
                shift >= 0 ? a.shiftLeft(shift).divideAndRemainder(den) : a.divideAndRemainder(den.shiftLeft(-shift));
        BigInteger q = qr[1].signum() == 0 ? qr[0] : qr[0].setBit(0);
        double rounded = q.doubleValue();
        int scale = exp - shift;
        double result;
        if (Double.isInfinite(rounded) || Math.getExponent(rounded) + scale > Double.MAX_EXPONENT) {
            result = Double.POSITIVE_INFINITY;
        } else if (Math.getExponent(rounded) + scale >= Double.MIN_EXPONENT) {
            result = Math.scalb(rounded, scale); // a normal double: scaling is exact
        } else {
            result = subnormal(a, den, exp);
        }
        return num.signum() < 0 ? -result : result;
    }

    /** a / den * 2^exp (a > 0), below the normal range: rounded at 2^-1074, ties to even. */
    private static double subnormal(BigInteger a, BigInteger den, int exp) {
        int up = exp - MIN_EXPONENT; // a / den * 2^up units of 2^-1074
        BigInteger divisor = up >= 0 ? den : den.shiftLeft(-up);
        BigInteger[] qr = (up >= 0 ? a.shiftLeft(up) : a).divideAndRemainder(divisor);
        int half = qr[1].shiftLeft(1).compareTo(divisor);
        BigInteger q = qr[0];
        if (half > 0 || (half == 0 && q.testBit(0))) {
            q = q.add(BigInteger.ONE);
        }
        // Units of 2^-1074 up to 2^52 (the least normal) are the double's bits as they are.
        return Double.longBitsToDouble(q.longValueExact());
    }
}
