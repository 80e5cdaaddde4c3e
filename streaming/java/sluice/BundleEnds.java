package sluice;

import java.util.HashMap;
import java.util.Map;
import java.util.UUID;
import pemja.core.PythonInterpreter;

/**
 * Bundle ends for PyFlink's thread mode (PEMJA), shared by {@link ThreadModeProcessOperator}
 * and {@link ThreadModeKeyedProcessOperator}.
 *
 * <p>Process mode finishes a bundle before every checkpoint barrier passes a Python operator
 * (AbstractPythonFunctionOperator.prepareSnapshotPreBarrier calls invokeFinishBundle), at every
 * bundle time and at the end of input; Sluice's functions flush their writers (Redis, dead
 * letters, statistics) there, which is what makes them at least once. Flink 2.0's embedded
 * operators keep those calls but leave invokeFinishBundle empty. These operators fill it: the
 * job parameter {@link #TOKEN} names the operator instance, the Python function registers its
 * flush under that name (streaming/bundle_ends.py), and invokeFinishBundle calls it in the
 * operator's own interpreter, on the task's thread: before the barrier, so a checkpoint never
 * completes ahead of the writes of what it covers; and every bundle time (the base class's
 * timer), so rows are written as fresh as in process mode. An exception there fails the
 * checkpoint and the task, and Flink restarts from the last completed checkpoint.
 */
final class BundleEnds {
  /** The job parameter holding the operator instance's name, read by the Python function. */
  static final String TOKEN = "sluice.bundle.token";

  // The registry module, bound in the interpreter's globals: methods of an object there are
  // what PyFlink's own calls use (invokeMethod("operation", ...)).
  private static final String REGISTRY = "_sluice_bundle_ends";

  final String token = UUID.randomUUID().toString();
  private boolean functionClosed; // the end of input closed the Python function
  private boolean closed;

  /** The job parameters with this instance's token added. */
  Map<String, String> parameters(Map<String, String> parameters) {
    Map<String, String> withToken = new HashMap<>(parameters);
    withToken.put(TOKEN, token);
    return withToken;
  }

  /** After the interpreter opened the operation: the registry module in its globals. */
  void opened(PythonInterpreter interpreter) {
    interpreter.exec("import streaming.bundle_ends as " + REGISTRY);
  }

  /** The function's flush, if it registered one and is still open. */
  void end(PythonInterpreter interpreter) {
    if (interpreter != null && !functionClosed && !closed) {
      interpreter.invokeMethod(REGISTRY, "end_bundle", token);
    }
  }

  /** The end of input closed the Python function (endInput, before finish's bundle end). */
  void inputEnded() {
    functionClosed = true;
  }

  /**
   * The operation is closing: thread mode closes the Python function only at the end of input
   * (endInput), process mode at every close; this closes it on a cancel or a stop with a
   * savepoint as well (its final flush), once, and forgets its flush.
   */
  void close(PythonInterpreter interpreter) {
    if (interpreter == null || closed) {
      return;
    }
    closed = true;
    try {
      if (!functionClosed) {
        interpreter.invokeMethod("operation", "close");
      }
    } finally {
      interpreter.invokeMethod(REGISTRY, "forget_bundle", token);
    }
  }
}
