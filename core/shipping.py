"""The project's Python code as one zip, shipped with a job to cluster workers.

A real cluster's workers run a job's Python functions from what the job ships (Flink's
``python.files``, Spark's ``addPyFile``), not from whatever version of Sluice their machine has
installed. ``code_archive`` zips the checkout's packages (and the definitions module's package
when it lives elsewhere), named by a hash of their content so each version is built once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import uuid
import zipfile
from pathlib import Path

# Top-level folders of the checkout that no engine worker imports.
_NOT_SHIPPED = frozenset({"tests", "bench", "docs", "data", "infra", "cli"})


def _code_roots() -> list[Path]:
    """The project's packages the job imports (the checkout's top-level packages), plus the
    package of the definitions module when it lives elsewhere."""
    root = Path(__file__).resolve().parents[1]
    return [
        d
        for d in sorted(root.iterdir())
        if d.is_dir() and (d / "__init__.py").is_file() and d.name not in _NOT_SHIPPED
    ]


def import_roots(modules: tuple[str, ...] = ()) -> list[Path]:
    """The folders a Python interpreter needs on sys.path to import the job's code here: the
    checkout's root, and where each of ``modules`` (a definitions module, a package or a plain
    module) is found. For an interpreter that does not run this venv's .pth files (PyFlink's
    thread mode embeds one in the JVM), so an editable install alone does not reach it."""
    roots = [Path(__file__).resolve().parents[1]]
    for name in modules:
        spec = importlib.util.find_spec(name.split(".")[0])
        if spec is None:
            continue
        if spec.submodule_search_locations:
            roots.append(Path(next(iter(spec.submodule_search_locations))).parent)
        elif spec.origin:
            roots.append(Path(spec.origin).parent)
    return list(dict.fromkeys(r.resolve() for r in roots))


def code_archive(directory: Path, extra_packages: tuple[str, ...] = ()) -> Path:
    """A zip of the job's Python code, named by its content's hash (made once per content)."""
    roots = _code_roots()
    for name in extra_packages:
        spec = importlib.util.find_spec(name.split(".")[0])
        if spec is not None and spec.submodule_search_locations:
            roots.append(Path(next(iter(spec.submodule_search_locations))))
    files: list[tuple[Path, str]] = []
    for root in dict.fromkeys(roots):
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                files.append((path, f"{root.name}/{path.relative_to(root).as_posix()}"))
    digest = hashlib.sha256()
    for path, arcname in files:
        digest.update(arcname.encode() + b"\0" + path.read_bytes())
    target = directory.resolve() / f"code-{digest.hexdigest()[:12]}.zip"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{uuid.uuid4().hex}.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for path, arcname in files:
                archive.write(path, arcname)
        tmp.replace(target)
    return target
