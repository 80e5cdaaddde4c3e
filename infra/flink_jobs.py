"""The Flink session cluster's jobs through its REST API (`sluice jobs`, the cluster tests):
list them, read a job's checkpoint statistics, cancel one."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

from core.errors import StackError
from core.settings import Settings
from infra.cluster import PROBE_TIMEOUT_S, flink_rest, get_json


def _flink_url(settings: Settings, path: str) -> str:
    host, port = flink_rest(settings)
    return f"http://{host}:{port}{path}"


def flink_jobs(settings: Settings) -> list[dict[str, Any]]:
    """The session cluster's jobs, newest first: id, name, state, start-time, duration."""
    try:
        overview = get_json(_flink_url(settings, "/jobs/overview"), PROBE_TIMEOUT_S)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        host, port = flink_rest(settings)
        raise StackError(f"the Flink JobManager at {host}:{port} did not answer: {exc}") from None
    jobs = [
        {k: job[k] for k in ("jid", "name", "state", "start-time", "duration")}
        for job in overview["jobs"]
    ]
    return sorted(jobs, key=lambda j: -int(j["start-time"]))


def flink_checkpoints(settings: Settings, job_id: str) -> dict[str, Any]:
    """The job's checkpoint statistics: counts, latest completed and restored checkpoint."""
    data: dict[str, Any] = get_json(
        _flink_url(settings, f"/jobs/{job_id}/checkpoints"), PROBE_TIMEOUT_S
    )
    return data


def cancel_flink_job(settings: Settings, job_id: str) -> None:
    """Cancel a job on the session cluster (its retained checkpoints stay for a restart)."""
    request = urllib.request.Request(
        _flink_url(settings, f"/jobs/{job_id}?mode=cancel"), method="PATCH"
    )
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S * 5):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise StackError(f"no Flink job {job_id} on the session cluster") from None
        raise StackError(f"cancelling Flink job {job_id}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise StackError(f"cancelling Flink job {job_id}: {exc}") from None
