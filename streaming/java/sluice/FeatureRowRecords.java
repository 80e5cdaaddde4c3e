package sluice;

import java.nio.charset.StandardCharsets;
import org.apache.flink.api.java.tuple.Tuple3;
import org.apache.flink.connector.kafka.sink.KafkaRecordSerializationSchema;
import org.apache.kafka.clients.producer.ProducerRecord;

/**
 * TileWindows' feature rows (entity, window end, record) as Kafka records of the view's features
 * topic, as streaming/sinks.py's RowPublisher writes them: keyed by the entity, stamped with
 * the window's end.
 */
public class FeatureRowRecords implements KafkaRecordSerializationSchema<Tuple3<String, Long, String>> {
    private final String topic;

    public FeatureRowRecords(String topic) {
        this.topic = topic;
    }

    @Override
    public ProducerRecord<byte[], byte[]> serialize(
            Tuple3<String, Long, String> row, KafkaSinkContext context, Long timestamp) {
        return new ProducerRecord<>(
                topic,
                null,
                row.f1,
                row.f0.getBytes(StandardCharsets.UTF_8),
                row.f2.getBytes(StandardCharsets.UTF_8));
    }
}
