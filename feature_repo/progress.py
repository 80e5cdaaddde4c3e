"""The stream's progress per view in Redis: how far every row of a view is written.

features/contract.py needs it to tell a row not written yet from a row that will never exist.
Each subtask of a streaming job publishes its settled watermark (every row of a window ending at
or before it is written: streaming/sinks.py) in one hash per view:

    key    sluice:progress:<project>:<view>
    field  "<parallelism>:<subtask>"
    value  "<progress ms>:<written at ms>"

The view's progress is the minimum over the subtasks of the run that wrote last (the group of
fields with the newest write): a run with another parallelism leaves fields of its own, which
must not hold the minimum down forever. A group that lacks a subtask (the run has just started)
has no proven progress: it reads as MIN_PROGRESS, so nothing is claimed exact before the
stream has shown it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

MIN_PROGRESS = -(2**63)


def progress_key(project: str, view_name: str) -> str:
    return f"sluice:progress:{project}:{view_name}"


def progress_field(parallelism: int, subtask: int) -> str:
    return f"{parallelism}:{subtask}"


def progress_value(progress_ms: int, written_at_ms: int) -> str:
    return f"{progress_ms}:{written_at_ms}"


def settled_progress(fields: Mapping[bytes, bytes]) -> int | None:
    """A view's progress from its hash (None: no stream ever published one). Fields that do not
    parse are ignored (they are not this layout's)."""
    runs: dict[int, dict[int, tuple[int, int]]] = {}
    for field, value in fields.items():
        try:
            parallelism, subtask = map(int, field.split(b":"))
            progress, written_at = map(int, value.split(b":"))
        except ValueError:
            continue
        if 0 <= subtask < parallelism:
            runs.setdefault(parallelism, {})[subtask] = (progress, written_at)
    if not runs:
        return None
    # The run that wrote last; on a tie (the same millisecond), the one that claims less.
    parallelism, subtasks = max(
        runs.items(),
        key=lambda run: (max(at for _, at in run[1].values()), -min(p for p, _ in run[1].values())),
    )
    if len(subtasks) < parallelism:
        return MIN_PROGRESS
    return min(progress for progress, _ in subtasks.values())


def publish(
    client: Any, project: str, view_name: str, subtask: int, parallelism: int, progress_ms: int
) -> None:
    """One subtask's progress (a redis.Redis client; errors are redis-py's)."""
    value = progress_value(progress_ms, int(time.time() * 1000))
    client.hset(progress_key(project, view_name), progress_field(parallelism, subtask), value)


def read(client: Any, project: str, view_names: Sequence[str]) -> list[int | None]:
    """Each view's progress (settled_progress), in one pipelined round trip."""
    with client.pipeline(transaction=False) as pipe:
        for name in view_names:
            pipe.hgetall(progress_key(project, name))
        replies = pipe.execute()
    return [settled_progress(fields) for fields in replies]
