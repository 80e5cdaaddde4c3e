package sluice;

import java.util.HashMap;
import java.util.Map;
import java.util.Optional;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonFactory;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonParser;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonToken;
import org.apache.flink.table.api.DataTypes;
import org.apache.flink.table.api.ValidationException;
import org.apache.flink.table.catalog.DataTypeFactory;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.table.functions.ScalarFunction;
import org.apache.flink.table.types.inference.TypeInference;

/**
 * The top-level fields of a JSON object, parsed once: sluice_json_fields(bytes, 'a,b') is a
 * ROW<a STRING, b STRING> of the values' text (strings unescaped, numbers as written, so a CAST
 * to DOUBLE rounds exactly as a JSON parser does; true/false; null for JSON null, objects,
 * arrays and absent fields; a repeated name: its last value). Not a JSON object, or not JSON:
 * a null row (the tile query then sends the record to Python, whose parser names the reason).
 * JSON_VALUE parses the whole record once per field, into a tree; this streams it once.
 *
 * <p>The row is built as Flink's internal RowData (no conversion per record), with the field
 * names taken from the literal second argument at planning time. Declared non-deterministic
 * so that the planner computes it once per row and does not inline it into every expression
 * that reads a field.
 */
public class JsonFields extends ScalarFunction {
    private static final JsonFactory FACTORY = new JsonFactory();
    private transient String lastNames;
    private transient Map<String, Integer> positions;

    public RowData eval(byte[] value, String names) {
        if (value == null) {
            return null;
        }
        if (!names.equals(lastNames)) {
            String[] split = names.split(",");
            positions = new HashMap<>();
            for (int i = 0; i < split.length; i++) {
                positions.put(split[i], i);
            }
            lastNames = names;
        }
        Map<String, Integer> wanted = positions;
        GenericRowData out = new GenericRowData(wanted.size());
        try (JsonParser parser = FACTORY.createParser(value)) {
            if (parser.nextToken() != JsonToken.START_OBJECT) {
                return null;
            }
            JsonToken token;
            while ((token = parser.nextToken()) == JsonToken.FIELD_NAME) {
                Integer at = wanted.get(parser.getCurrentName());
                JsonToken next = parser.nextToken();
                if (next == JsonToken.START_OBJECT || next == JsonToken.START_ARRAY) {
                    parser.skipChildren();
                    if (at != null) {
                        out.setField(at, null);
                    }
                } else if (at != null) {
                    out.setField(
                            at,
                            next == JsonToken.VALUE_NULL
                                    ? null
                                    : StringData.fromString(parser.getText()));
                }
            }
            if (token != JsonToken.END_OBJECT || parser.nextToken() != null) {
                return null;
            }
        } catch (Exception e) {
            return null;
        }
        return out;
    }

    @Override
    public TypeInference getTypeInference(DataTypeFactory typeFactory) {
        return TypeInference.newBuilder()
                .typedArguments(DataTypes.BYTES(), DataTypes.STRING())
                .outputTypeStrategy(
                        context -> {
                            String names =
                                    context.getArgumentValue(1, String.class)
                                            .orElseThrow(
                                                    () ->
                                                            new ValidationException(
                                                                    "sluice_json_fields: the"
                                                                            + " field names must"
                                                                            + " be a literal"));
                            String[] split = names.split(",");
                            DataTypes.Field[] fields = new DataTypes.Field[split.length];
                            for (int i = 0; i < split.length; i++) {
                                fields[i] = DataTypes.FIELD(split[i], DataTypes.STRING());
                            }
                            return Optional.of(DataTypes.ROW(fields).bridgedTo(RowData.class));
                        })
                .build();
    }

    @Override
    public boolean isDeterministic() {
        return false;
    }
}
