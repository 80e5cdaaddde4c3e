package sluice;

import java.nio.charset.StandardCharsets;
import java.util.zip.CRC32;
import org.apache.flink.table.functions.ScalarFunction;

/**
 * The shard of an entity's tiles (streaming/tile_state.py, shard_of): CRC-32 of the entity's
 * UTF-8 bytes modulo the number of shards, or -1 (the side key) for rows without an entity.
 * java.util.zip.CRC32 is the CRC-32 of Python's zlib.crc32, so both sides agree.
 */
public class Shard extends ScalarFunction {
    public int eval(String entity, int shards) {
        if (entity == null) {
            return -1;
        }
        CRC32 crc = new CRC32();
        crc.update(entity.getBytes(StandardCharsets.UTF_8));
        return (int) (crc.getValue() % shards);
    }
}
