"""`sluice retrain` on a simulated history (real Spark): a broken champion is replaced, a
challenger that cannot meet the margin is refused, each decision is recorded, and a decided
period is not decided again (the cron path, in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from cli.main import run
from core.settings import Settings
from examples.delivery.features import delivery_eta
from models.fit import fit
from models.registry import ModelRegistry
from tests.helpers.serving import synthetic_training_set
from tests.helpers.spark import isolated_settings, simulated_history

pytestmark = [pytest.mark.integration, pytest.mark.spark, pytest.mark.slow]
# Evening into the night: the history crosses midnight, so the daily batch view has values.
START = datetime(2026, 11, 10, 20, tzinfo=UTC)
SLUICE = str(Path(sys.executable).with_name("sluice"))


@pytest.fixture(scope="module")
def settings(spark, stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    tmp: Path = tmp_path_factory.mktemp("retrain")
    settings = isolated_settings(stack_settings, tmp, "retrain_test")
    simulated_history(spark, settings, 60_000, START)
    return settings


@pytest.fixture(scope="module")
def config(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("retrain_config") / "sluice.yaml"
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    return path


def test_retrain_replaces_a_broken_champion_and_refuses_a_margin_it_cannot_meet(
    settings: Settings, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = ModelRegistry(settings.models_dir)
    # The champion learnt another city (synthetic rows): same inputs, wrong answers.
    broken = fit(
        synthetic_training_set(delivery_eta, n=300), delivery_eta, label="delivery_seconds"
    )
    models.promote("delivery_eta", models.save(broken.model_text, broken.metadata).version)
    args = ["--config", str(config), "retrain", "--service", "delivery_eta", "--period", "30d"]

    assert run([*args, "--rounds", "60"]) == 0
    out = capsys.readouterr().out
    [decision] = models.decisions("delivery_eta")
    assert decision.outcome == "promoted", decision.reason
    assert f"delivery_eta {decision.period}: promoted: MAE" in out
    assert models.production("delivery_eta") == 2
    champion, challenger = decision.champion, decision.challenger
    assert champion is not None
    assert champion.version == 1
    assert challenger.version == 2
    assert champion.mae is not None
    assert challenger.mae is not None
    assert challenger.mae < 0.98 * champion.mae
    assert decision.improvement == pytest.approx(1 - challenger.mae / champion.mae)
    assert all(g.passed for g in challenger.gates), challenger.gates
    assert decision.warm_start  # the champion reads the same inputs: its trees were kept
    assert decision.rows_train > 3 * decision.rows_eval
    assert decision.period_ms[1] % 3_600_000 == 0  # the newest label, rounded up to the hour
    assert decision.period_ms[1] - decision.period_ms[0] == 30 * 86_400_000
    meta = models.metadata("delivery_eta", 2)
    assert meta.metrics.mae == challenger.mae
    assert meta.notes["retrain"] == decision.period

    # Cron runs it again: the period is decided, nothing is trained (no Spark needed).
    env = os.environ | {"SLUICE_CONFIG": str(config)}
    again = subprocess.run(
        [SLUICE, "retrain", "--service", "delivery_eta", "--period", "30d"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert "decided before" in again.stdout
    assert models.versions("delivery_eta") == [1, 2]
    assert models.decisions("delivery_eta") == [decision]
    # A period without labels is one line and exit 6 (input data), for cron's mail.
    empty = subprocess.run(
        [SLUICE, "retrain", "--period", "1d", "--until", "2026-01-01"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert empty.returncode == 6, empty.stderr
    assert empty.stderr.count("\n") == 1
    assert empty.stderr.startswith("error: labels 'delivery_times': no label in period")

    # Forced, with a margin no challenger of the same data can meet: refused, recorded.
    assert run([*args, "--rounds", "30", "--force", "--margin", "0.9"]) == 0
    [refused] = models.decisions("delivery_eta")
    assert refused.period == decision.period
    assert refused.outcome == "refused"
    assert "not better by the margin 90.00%" in refused.reason
    assert refused.champion is not None
    assert refused.champion.version == 2
    assert refused.champion.mae == pytest.approx(challenger.mae)  # the same held-out rows
    assert refused.challenger.version == 3
    assert models.production("delivery_eta") == 2
