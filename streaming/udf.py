"""The tile engine's Java aggregate functions (streaming/java/): compiled once per source hash.

A jar of the classes in streaming/java is built with the JDK's javac against PyFlink's jars
into settings.state_dir/flink/udf/<hash>.jar the first time a job needs it, then reused. The
job ships it with ``pipeline.jars`` and registers each function by name (FUNCTIONS).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

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

    flink_lib = Path(pyflink.__file__).resolve().parent / "lib"
    jar.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as build:
        command = [javac, "-nowarn", "-d", build, "-cp", f"{flink_lib}/*", *map(str, sources)]
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
