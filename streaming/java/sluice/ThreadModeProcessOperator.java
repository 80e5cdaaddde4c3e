package sluice;

import java.util.Map;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.streaming.api.functions.python.DataStreamPythonFunctionInfo;
import org.apache.flink.streaming.api.operators.python.embedded.AbstractEmbeddedDataStreamPythonFunctionOperator;
import org.apache.flink.streaming.api.operators.python.embedded.EmbeddedPythonProcessOperator;

/**
 * PyFlink's thread-mode process operator with bundle ends (see {@link BundleEnds}):
 * what streaming/python_operators.py builds for a Python ProcessFunction in thread mode.
 */
public class ThreadModeProcessOperator<IN, OUT>
    extends EmbeddedPythonProcessOperator<IN, OUT> {
  private static final long serialVersionUID = 1L;

  private final TypeInformation<IN> input;
  private transient BundleEnds bundles;

  public ThreadModeProcessOperator(
      Configuration config,
      DataStreamPythonFunctionInfo function,
      TypeInformation<IN> input,
      TypeInformation<OUT> output) {
    super(config, function, input, output);
    this.input = input;
  }

  private BundleEnds bundles() {
    if (bundles == null) {
      bundles = new BundleEnds();
    }
    return bundles;
  }

  @Override
  public Map<String, String> getJobParameters() {
    return bundles().parameters(super.getJobParameters());
  }

  @Override
  public void openPythonInterpreter() {
    super.openPythonInterpreter();
    bundles().opened(interpreter);
  }

  @Override
  protected void invokeFinishBundle() throws Exception {
    bundles().end(interpreter);
  }

  @Override
  public void endInput() {
    super.endInput(); // closes the Python function
    bundles().inputEnded();
  }

  @Override
  public void close() throws Exception {
    try {
      bundles().close(interpreter);
    } finally {
      super.close();
    }
  }

  @Override
  public <T> AbstractEmbeddedDataStreamPythonFunctionOperator<T> copy(
      DataStreamPythonFunctionInfo function, TypeInformation<T> output) {
    return new ThreadModeProcessOperator<>(getConfiguration(), function, input, output);
  }
}
