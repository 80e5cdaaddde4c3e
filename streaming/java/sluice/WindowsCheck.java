package sluice;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.ObjectMapper;

/**
 * Drives a WindowAssembler from standard input, for tests against the Python engine
 * (tests/integration/test_java_windows.py). First line: the view plan (WindowAssembler). Then
 * one JSON array per line: ["tile", entity, bucket, [state columns as the tile SQL emits them]]
 * or ["fire", entity, upto]. Each row fired is printed as a features-topic record (FeatureRows)
 * with emitted_at_ms 0.
 */
public final class WindowsCheck {
    private WindowsCheck() {}

    public static void main(String[] args) throws Exception {
        ObjectMapper json = new ObjectMapper();
        BufferedReader in =
                new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        WindowAssembler plan = new WindowAssembler(in.readLine());
        FeatureRows rows = new FeatureRows(plan.view, plan.names);
        Map<String, WindowAssembler.EntityWindows> entities = new HashMap<>();
        StringBuilder out = new StringBuilder();
        for (String line = in.readLine(); line != null; line = in.readLine()) {
            JsonNode op = json.readTree(line);
            String entity = op.get(1).asText();
            WindowAssembler.EntityWindows state =
                    entities.computeIfAbsent(entity, e -> new WindowAssembler.EntityWindows());
            if ("tile".equals(op.get(0).asText())) {
                List<Object> columns = new ArrayList<>();
                for (JsonNode column : op.get(3)) {
                    columns.add(
                            column.isNull()
                                    ? null
                                    : column.isIntegralNumber()
                                            ? (Object) column.asLong()
                                            : column.isNumber() ? (Object) column.asDouble() : column.asText());
                }
                plan.addTile(state, op.get(2).asLong(), plan.decode(columns, 0));
            } else {
                plan.fire(
                        state,
                        op.get(2).asLong(),
                        (end, values) ->
                                out.append(rows.encode(entity, end, values, 0)).append('\n'));
            }
        }
        System.out.print(out);
    }
}
