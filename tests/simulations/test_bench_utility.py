"""The privacy-utility bench's modes: each one dict of run-config overrides for its epsilon."""

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from common.config import known_keys
from common.privacy import UpdateAccountant
from server.tracking import ensure_store
from simulations.bench.runner import PROFILES, RunResult
from simulations.bench.utility import SECAGG_KEY, degraded_note, failure_note, modes


def test_every_mode_is_run_config_overrides_and_each_dp_mode_reaches_its_epsilon():
    profile = PROFILES["quick"]
    found = modes(profile, "classification", profile.classification_model)
    assert list(found) == [
        "none",
        "dp-sgd-eps1",
        "dp-sgd-eps3",
        "dp-sgd-eps8",
        "update-dp-eps1",
        "update-dp-eps3",
        "update-dp-eps8",
        "secagg",
    ]
    for name, settings in found.items():
        if name != "secagg":
            assert set(settings) <= known_keys(), name
    assert found["secagg"] == {SECAGG_KEY: True}
    sigmas = [found[f"dp-sgd-eps{e}"]["dp-noise-multiplier"] for e in (1, 3, 8)]
    assert sigmas == sorted(sigmas, reverse=True)  # more noise for a smaller epsilon
    for epsilon in (1, 3, 8):
        settings = found[f"update-dp-eps{epsilon}"]
        assert settings["dp-update-epsilon"] == epsilon
        accountant = UpdateAccountant(settings["dp-update-noise-multiplier"], 1.0, 1e-5)
        # Within the budget the run enforces, and close to it.
        assert accountant.epsilon(profile.rounds) <= epsilon
        assert accountant.epsilon(profile.rounds) == pytest.approx(epsilon, rel=0.01)


def test_a_failed_cells_note_keeps_the_command_and_the_error_that_ended_it():
    """A failed cell's note names its command and why it failed (the first line alone, which
    the table showed before, ended in "exited with 2:" and lost the cause)."""
    error = (
        "`radfl simulate --seed 0` exited with 2:\n[radfl] round 1\n"
        "radfl: error: run-config key 'x' is unknown\nWall time: 3 s\n"
    )
    note = failure_note(error)
    assert (
        note
        == "`radfl simulate --seed 0` exited with 2: radfl: error: run-config key 'x' is unknown"
    )
    assert (
        failure_note("`radfl simulate` exited with 1:\nKilled")
        == "`radfl simulate` exited with 1: Killed"
    )
    assert failure_note("") == "no output"


def test_a_cell_whose_run_lost_a_site_or_a_round_says_so(tmp_path: Path) -> None:
    """The run finished, but a site's worker was killed and the round failed (what the run
    logs then: ``round/failed``, ``robustness/rejections.csv``, the final-evaluation tag): its
    cell is not the mode's effect, and its note says why."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ensure_store(uri)  # a copy of a cached empty store, not MLflow's migrations
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as clean:
        mlflow.log_metric("round/failed", 0.0, step=1)
    with mlflow.start_run() as hurt:
        mlflow.log_metric("round/failed", 0.0, step=1)
        mlflow.log_metric("round/failed", 1.0, step=2)
        mlflow.set_tag("radfl.final-evaluation-failed", "site-1")
        mlflow.log_text(
            'round,site,reason\n0,node-7,"left out: did not describe itself: OutOfMemoryError"\n'
            "1,site-0,error reply\n",
            "robustness/rejections.csv",
        )

    def result(run_id: str) -> RunResult:
        return RunResult(run_id=run_id, metrics={}, wall_s=1.0, client=client)

    assert degraded_note(result(clean.info.run_id)) == ""
    assert degraded_note(result(hurt.info.run_id)) == (
        "1 round(s) failed, the global model kept; left out: node-7; "
        "final evaluation failed at site-1 (robustness/rejections.csv of the run)"
    )
