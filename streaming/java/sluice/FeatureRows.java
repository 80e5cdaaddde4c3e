package sluice;

/**
 * A row of a view's features topic as core/records.py's FeatureRow.encode_row writes it: one
 * JSON object (v, view, entity_key, window_end_ms, values, emitted_at_ms). Values: integers as
 * integers, floats as doubles (a non-finite one as null, as orjson writes it), text, booleans.
 */
public final class FeatureRows {
    public static final int VERSION = 1;

    private final String head; // {"v":1,"view":"<view>","entity_key":
    private final String[] keys; // "<name>": (the first), ,"<name>": (the others)

    /** The rows of one view: its name and feature names are escaped once, not per row
     * (escaping, char by char, was half of the row's encoding in a profile of a 1M replay). */
    public FeatureRows(String view, String[] names) {
        StringBuilder json = new StringBuilder("{\"v\":").append(VERSION).append(",\"view\":");
        text(json, view);
        head = json.append(",\"entity_key\":").toString();
        keys = new String[names.length];
        for (int i = 0; i < names.length; i++) {
            StringBuilder key = new StringBuilder(i > 0 ? "," : "");
            text(key, names[i]);
            keys[i] = key.append(':').toString();
        }
    }

    public String encode(String entity, long end, Object[] values, long emittedAt) {
        StringBuilder json = new StringBuilder(head.length() + 64 + 24 * keys.length);
        json.append(head);
        text(json, entity);
        json.append(",\"window_end_ms\":").append(end).append(",\"values\":{");
        for (int i = 0; i < keys.length; i++) {
            json.append(keys[i]);
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
        int from = 0; // the text up to here is in json: the runs between escapes go in whole
        for (int i = 0; i < text.length(); i++) {
            char c = text.charAt(i);
            if (c == '"' || c == '\\' || c < 0x20) {
                json.append(text, from, i);
                from = i + 1;
                if (c < 0x20) {
                    json.append(String.format("\\u%04x", (int) c));
                } else {
                    json.append('\\').append(c);
                }
            }
        }
        json.append(text, from, text.length()).append('"');
    }
}
