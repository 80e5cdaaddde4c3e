"""Fixtures every test gets."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _own_prediction_log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's predictor gets a write-ahead log directory of its own: the default, under
    the user's state directory, is locked by one predictor at a time, and tests (and several
    test runs on one machine) start many."""
    monkeypatch.setenv("SLUICE_PREDICTION_LOG_DIR", str(tmp_path / "prediction-log"))
