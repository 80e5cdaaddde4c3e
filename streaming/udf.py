"""The tile engine's Java aggregate functions (streaming/java/): compiled once per source hash.

A jar of the classes in streaming/java is built with the JDK's javac against PyFlink's jars
into settings.state_dir/flink/udf/<hash>.jar the first time a job needs it, then reused. The
job ships it with ``pipeline.jars`` and registers each function by name (FUNCTIONS).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from streaming.errors import StreamJobError

JAVA_DIR = Path(__file__).resolve().parent / "java"
# SQL name -> Java class.
FUNCTIONS = {
    "sluice_moments": "sluice.Moments",
    "sluice_sum": "sluice.ExactSum",
    "sluice_json_fields": "sluice.JsonFields",
    "sluice_event_id": "sluice.EventId",
    "sluice_shard": "sluice.Shard",
    "sluice_distinct_sums": "sluice.DistinctSums",
}
COMPILE_TIMEOUT_S = 120


def _sources() -> list[Path]:
    return sorted(JAVA_DIR.rglob("*.java"))


def udf_jar(state_dir: Path) -> Path:
    """The jar of streaming/java's classes, compiled if this version of them has none yet."""
    sources = _sources()
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    jar = state_dir / "flink" / "udf" / f"sluice-udf-{digest}.jar"
    if jar.exists():
        return jar
    javac = shutil.which("javac")
    if javac is None:
        raise StreamJobError(
            "the tile engine compiles its Java functions with javac, which is not on PATH: "
            "install a JDK (17) or set stream_engine to 'events'"
        )
    import pyflink

    flink = Path(pyflink.__file__).resolve().parent
    # PyFlink's jars, and its Python runtime's (the thread-mode operators extend its classes).
    runtime = sorted(str(j) for j in (flink / "opt").glob("flink-python-*.jar"))
    classpath = os.pathsep.join([f"{flink / 'lib'}/*", *runtime])
    jar.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as build:
        command = [javac, "-nowarn", "-d", build, "-cp", classpath, *map(str, sources)]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False
        )
        if done.returncode != 0:
            raise StreamJobError(f"javac failed on streaming/java: {done.stderr.strip()[:500]}")
        partial = jar.with_suffix(".tmp")
        with zipfile.ZipFile(partial, "w") as archive:
            for path in sorted(Path(build).rglob("*.class")):
                archive.write(path, path.relative_to(build).as_posix())
        partial.replace(jar)  # whole or absent, also with concurrent jobs
    return jar


def jar_loader() -> Any:
    """The class loader that sees the jar's classes once the job's environment exists (its
    pipeline.jars): the gateway thread's context loader; py4j's gateway.jvm does not."""
    from pyflink.java_gateway import get_gateway

    return get_gateway().jvm.Thread.currentThread().getContextClassLoader()


def construct(java_class: Any, *arguments: tuple[Any, Any]) -> Any:
    """new java_class(arguments...) through reflection; each argument: (its Java class, value)."""
    from pyflink.java_gateway import get_gateway

    gateway = get_gateway()
    lang = gateway.jvm.java.lang
    types = gateway.new_array(lang.Class, len(arguments))
    values = gateway.new_array(lang.Object, len(arguments))
    for i, (java_type, value) in enumerate(arguments):
        types[i], values[i] = java_type, value
    return java_class.getConstructor(types).newInstance(values)
