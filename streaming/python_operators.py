"""Python process functions in the job, in either of PyFlink's execution modes.

Process mode (Beam workers): ``stream.process(function)``; a bundle ends before every
checkpoint barrier and the functions flush their writers there (streaming/functions.py).
Thread mode (PEMJA, the interpreter embedded in the TaskManager's JVM): PyFlink's own embedded
operators never end a bundle, so the same functions would hold their writes past a checkpoint.
Here they run in sluice.ThreadModeProcessOperator / ThreadModeKeyedProcessOperator
(streaming/java/sluice/BundleEnds.java), PyFlink's embedded operators with the bundle end
filled in: the construction of KeyedStream.process / DataStream.process
(pyflink/datastream/data_stream.py, PyFlink 2.0.0) with that class in place of PyFlink's.
"""

from __future__ import annotations

from typing import Any

from streaming.errors import StreamJobError

THREAD = "thread"


def execution_mode(stream: Any) -> str:
    """python.execution-mode of the stream's environment."""
    from pyflink.java_gateway import get_gateway
    from pyflink.util.java_utils import get_j_env_configuration

    j_conf = get_j_env_configuration(stream._j_data_stream.getExecutionEnvironment())
    options = get_gateway().jvm.org.apache.flink.python.PythonOptions
    return str(j_conf.get(options.PYTHON_EXECUTION_MODE))


def process(stream: Any, function: Any, output_type: Any = None) -> Any:
    """``stream.process(function, output_type)``, at least once in thread mode as well."""
    if execution_mode(stream) != THREAD:
        return stream.process(function, output_type)

    from pyflink.common import Types
    from pyflink.datastream import DataStream, KeyedProcessFunction
    from pyflink.datastream.data_stream import (
        KeyedStream,
        _create_j_data_stream_python_function_info,
    )
    from pyflink.fn_execution.flink_fn_execution_pb2 import UserDefinedDataStreamFunction
    from pyflink.java_gateway import get_gateway
    from pyflink.util.java_utils import get_j_env_configuration

    from streaming.udf import construct, jar_loader

    keyed = isinstance(stream, KeyedStream)
    if keyed != isinstance(function, KeyedProcessFunction):
        raise StreamJobError("a KeyedProcessFunction goes on a keyed stream, a ProcessFunction not")
    kind = (
        UserDefinedDataStreamFunction.KEYED_PROCESS
        if keyed
        else UserDefinedDataStreamFunction.PROCESS
    )
    operator_class = "ThreadModeKeyedProcessOperator" if keyed else "ThreadModeProcessOperator"
    j_stream = stream._j_data_stream
    output = Types.PICKLED_BYTE_ARRAY() if output_type is None else output_type
    j_output = output.get_java_type_info()
    jvm = get_gateway().jvm
    type_info = jvm.org.apache.flink.api.common.typeinfo.TypeInformation._java_lang_class
    info_class = jvm.org.apache.flink.streaming.api.functions.python.DataStreamPythonFunctionInfo
    operator = construct(
        jar_loader().loadClass(f"sluice.{operator_class}"),
        (
            jvm.org.apache.flink.configuration.Configuration._java_lang_class,
            get_j_env_configuration(j_stream.getExecutionEnvironment()),
        ),
        (info_class._java_lang_class, _create_j_data_stream_python_function_info(function, kind)),
        (type_info, j_stream.getTransformation().getOutputType()),
        (type_info, j_output),
    )
    name = "KEYED PROCESS" if keyed else "PROCESS"
    return DataStream(j_stream.transform(name, j_output, operator))
