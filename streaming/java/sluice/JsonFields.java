package sluice;

import java.util.Arrays;
import java.util.HashMap;
import java.util.HashSet;
import java.util.Map;
import java.util.Set;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonFactory;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonParser;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonToken;
import org.apache.flink.table.annotation.DataTypeHint;
import org.apache.flink.table.functions.ScalarFunction;

/**
 * The top-level fields of a JSON object, parsed once: name -> the value's text (strings
 * unescaped, numbers as written, so a CAST to DOUBLE rounds exactly as a JSON parser does;
 * true/false; null for JSON null, objects and arrays). Only the names asked for (a comma
 * separated list) are kept. Not a JSON object, or not JSON: null (the tile query then sends
 * the record to Python, whose parser names the reason). JSON_VALUE parses the whole record
 * once per field; this parses it once per record.
 *
 * <p>Declared non-deterministic so that the planner computes it once per row and does not
 * inline it into every expression that reads a field.
 */
public class JsonFields extends ScalarFunction {
    private static final JsonFactory FACTORY = new JsonFactory();
    private transient String lastNames;
    private transient Set<String> lastWanted;

    public @DataTypeHint("MAP<STRING, STRING>") Map<String, String> eval(
            byte[] value, String names) {
        if (value == null) {
            return null;
        }
        if (!names.equals(lastNames)) {
            lastWanted = new HashSet<>(Arrays.asList(names.split(",")));
            lastNames = names;
        }
        Set<String> wanted = lastWanted;
        Map<String, String> out = new HashMap<>();
        try (JsonParser parser = FACTORY.createParser(value)) {
            if (parser.nextToken() != JsonToken.START_OBJECT) {
                return null;
            }
            JsonToken token;
            while ((token = parser.nextToken()) == JsonToken.FIELD_NAME) {
                String name = parser.getCurrentName();
                JsonToken next = parser.nextToken();
                if (next == JsonToken.START_OBJECT || next == JsonToken.START_ARRAY) {
                    parser.skipChildren();
                    if (wanted.contains(name)) {
                        out.put(name, null);
                    }
                } else if (wanted.contains(name)) {
                    out.put(name, next == JsonToken.VALUE_NULL ? null : parser.getText());
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
    public boolean isDeterministic() {
        return false;
    }
}
