package sluice;

import org.apache.flink.table.annotation.DataTypeHint;
import org.apache.flink.table.functions.ScalarFunction;

/**
 * An event's identity for deduplication: 128 bits of MurmurHash3 (x64, 128-bit variant, seed
 * 0) over the record's bytes, as 16 bytes. Duplicates are byte-identical copies (ingest is at
 * least once), so equal records get equal ids; two different records of one (entity, tile)
 * share an id with probability about n^2 / 2^129 for n events. It replaces MD5 over the record
 * decoded to text and hex-encoded: no text decoding, no digest object, no hex string.
 */
public class EventId extends ScalarFunction {
    private static final long C1 = 0x87c37b91114253d5L;
    private static final long C2 = 0x4cf5ad432745937fL;

    public @DataTypeHint("BYTES") byte[] eval(byte[] value) {
        if (value == null) {
            return null;
        }
        long h1 = 0;
        long h2 = 0;
        int n = value.length;
        int blocks = n / 16;
        for (int i = 0; i < blocks; i++) {
            long k1 = getLong(value, i * 16);
            long k2 = getLong(value, i * 16 + 8);
            h1 ^= mixK1(k1);
            h1 = Long.rotateLeft(h1, 27);
            h1 += h2;
            h1 = h1 * 5 + 0x52dce729;
            h2 ^= mixK2(k2);
            h2 = Long.rotateLeft(h2, 31);
            h2 += h1;
            h2 = h2 * 5 + 0x38495ab5;
        }
        long k1 = 0;
        long k2 = 0;
        int tail = blocks * 16;
        switch (n & 15) {
            case 15: k2 ^= ((long) value[tail + 14] & 0xff) << 48;
            case 14: k2 ^= ((long) value[tail + 13] & 0xff) << 40;
            case 13: k2 ^= ((long) value[tail + 12] & 0xff) << 32;
            case 12: k2 ^= ((long) value[tail + 11] & 0xff) << 24;
            case 11: k2 ^= ((long) value[tail + 10] & 0xff) << 16;
            case 10: k2 ^= ((long) value[tail + 9] & 0xff) << 8;
            case 9:
                k2 ^= ((long) value[tail + 8] & 0xff);
                h2 ^= mixK2(k2);
            case 8: k1 ^= ((long) value[tail + 7] & 0xff) << 56;
            case 7: k1 ^= ((long) value[tail + 6] & 0xff) << 48;
            case 6: k1 ^= ((long) value[tail + 5] & 0xff) << 40;
            case 5: k1 ^= ((long) value[tail + 4] & 0xff) << 32;
            case 4: k1 ^= ((long) value[tail + 3] & 0xff) << 24;
            case 3: k1 ^= ((long) value[tail + 2] & 0xff) << 16;
            case 2: k1 ^= ((long) value[tail + 1] & 0xff) << 8;
            case 1:
                k1 ^= ((long) value[tail] & 0xff);
                h1 ^= mixK1(k1);
            default:
                break;
        }
        h1 ^= n;
        h2 ^= n;
        h1 += h2;
        h2 += h1;
        h1 = fmix(h1);
        h2 = fmix(h2);
        h1 += h2;
        h2 += h1;
        byte[] out = new byte[16];
        putLong(out, 0, h1);
        putLong(out, 8, h2);
        return out;
    }

    static long getLong(byte[] b, int at) {
        long v = 0;
        for (int i = 7; i >= 0; i--) {
            v = (v << 8) | (b[at + i] & 0xffL);
        }
        return v;
    }

    private static void putLong(byte[] b, int at, long v) {
        for (int i = 0; i < 8; i++) {
            b[at + i] = (byte) (v >>> (8 * i));
        }
    }

    private static long mixK1(long k1) {
        k1 *= C1;
        k1 = Long.rotateLeft(k1, 31);
        return k1 * C2;
    }

    private static long mixK2(long k2) {
        k2 *= C2;
        k2 = Long.rotateLeft(k2, 33);
        return k2 * C1;
    }

    private static long fmix(long k) {
        k ^= k >>> 33;
        k *= 0xff51afd7ed558ccdL;
        k ^= k >>> 33;
        k *= 0xc4ceb53ca87ec2b9L;
        k ^= k >>> 33;
        return k;
    }
}
