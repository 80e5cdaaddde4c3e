"""The stream's per-view progress marker: how a view's progress is read from its hash."""

from __future__ import annotations

from feature_repo.progress import MIN_PROGRESS, progress_field, progress_value, settled_progress


def fields(*entries: tuple[int, int, int, int]) -> dict[bytes, bytes]:
    """(parallelism, subtask, progress, written at) -> the hash as Redis answers it."""
    return {
        progress_field(p, s).encode(): progress_value(progress, at).encode()
        for p, s, progress, at in entries
    }


def test_no_marker_is_unknown():
    assert settled_progress({}) is None


def test_the_minimum_over_the_subtasks_of_a_run():
    assert settled_progress(fields((2, 0, 5_000, 10), (2, 1, 4_000, 11))) == 4_000


def test_a_run_missing_a_subtask_has_proved_nothing():
    assert settled_progress(fields((2, 0, 5_000, 10))) == MIN_PROGRESS


def test_the_run_that_wrote_last_wins_over_another_parallelism():
    # An earlier run at parallelism 2 left subtask 1 far behind; the new run has parallelism 1.
    old = ((2, 0, 3_000, 10), (2, 1, 1_000, 11))
    assert settled_progress(fields(*old, (1, 0, 9_000, 20))) == 9_000
    # ... and the other way round, when the parallelism-2 run is the newer one.
    assert settled_progress(fields((1, 0, 9_000, 5), *old)) == 1_000


def test_foreign_fields_are_ignored():
    raw = fields((1, 0, 7_000, 1))
    raw[b"junk"] = b"1:2"
    raw[b"1:5"] = b"8:9"  # subtask outside the parallelism
    raw[b"1:0x"] = b"x"
    assert settled_progress(raw) == 7_000


def test_on_a_tie_of_write_times_the_run_that_claims_less_wins():
    assert (
        settled_progress(fields((2, 0, 5_000, 10), (2, 1, 6_000, 10), (1, 0, 9_000, 10))) == 5_000
    )
