package sluice;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;

/**
 * Drives ExactSum and Moments from standard input, for tests against exact rational arithmetic
 * (tests/integration/test_java_windows.py): one set of doubles per line, separated by spaces;
 * prints each set's sluice_sum and sluice_moments results, separated by "|".
 */
public final class SumsCheck {
    private SumsCheck() {}

    public static void main(String[] args) throws Exception {
        BufferedReader in =
                new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        ExactSum sum = new ExactSum();
        Moments moments = new Moments();
        StringBuilder out = new StringBuilder();
        for (String line = in.readLine(); line != null; line = in.readLine()) {
            ExactSum.Acc s = sum.createAccumulator();
            Moments.Acc m = moments.createAccumulator();
            for (String text : line.trim().split(" ")) {
                double x = Double.parseDouble(text);
                sum.accumulate(s, x);
                moments.accumulate(m, x);
            }
            out.append(sum.getValue(s)).append('|').append(moments.getValue(m)).append('\n');
        }
        System.out.print(out);
    }
}
