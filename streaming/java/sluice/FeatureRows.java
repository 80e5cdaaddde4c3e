package sluice;

/**
 * A row of a view's features topic as core/records.py's FeatureRow.encode_row writes it: one
 * JSON object (v, view, entity_key, window_end_ms, values, emitted_at_ms). Values: integers as
 * integers, floats as doubles (a non-finite one as null, as orjson writes it), text, booleans.
 */
public final class FeatureRows {
    public static final int VERSION = 1;

    private FeatureRows() {}

    public static String encode(
            String view, String entity, long end, String[] names, Object[] values, long emittedAt) {
        StringBuilder json = new StringBuilder(96 + 24 * names.length);
        json.append("{\"v\":").append(VERSION).append(",\"view\":");
        text(json, view);
        json.append(",\"entity_key\":");
        text(json, entity);
        json.append(",\"window_end_ms\":").append(end).append(",\"values\":{");
        for (int i = 0; i < names.length; i++) {
            if (i > 0) {
                json.append(',');
            }
            text(json, names[i]);
            json.append(':');
            value(json, values[i]);
        }
        return json.append("},\"emitted_at_ms\":").append(emittedAt).append('}').toString();
    }

    static void value(StringBuilder json, Object value) {
        if (value == null) {
            json.append("null");
        } else if (value instanceof Double) {
            double x = (Double) value;
            json.append(Double.isFinite(x) ? Double.toString(x) : "null");
        } else if (value instanceof String) {
            text(json, (String) value);
        } else {
            json.append(value); // Long, Boolean
        }
    }

    static void text(StringBuilder json, String text) {
        json.append('"');
        for (int i = 0; i < text.length(); i++) {
            char c = text.charAt(i);
            if (c == '"' || c == '\\') {
                json.append('\\').append(c);
            } else if (c < 0x20) {
                json.append(String.format("\\u%04x", (int) c));
            } else {
                json.append(c);
            }
        }
        json.append('"');
    }
}
