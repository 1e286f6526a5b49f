"""A coordinator killed with SIGKILL after round 3 of 4 and resumed: four rounds in one MLflow
run, none repeated or missing, ending where an uninterrupted run with the same seed ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from server import checkpoint
from simulations.local_superlink import descendants
from tests.simulations.test_simulate_e2e import RADFL, _env

pytestmark = pytest.mark.slow

ROUNDS = 4  # one round after the crash proves the resume; more only cost time


def _command(workdir: Path, *extra: str) -> list[str]:
    settings = {
        "image-size": 32,
        "synthetic-samples-per-site": 40,
        "batch-size": 8,
        "local-epochs": 1,
        "min-cell-size": 2,
        "strategy": "fedadam",  # server state (Adam moments) must survive the crash too
        "server-learning-rate": 0.01,
    }
    overrides = [part for k, v in settings.items() for part in ("--set", f"{k}={v}")]
    return [
        RADFL, "simulate", "--in-memory", "--sites", "3", "--rounds", str(ROUNDS),
        "--model", "small-cnn", "--seed", "3", "--workdir", str(workdir), *overrides, *extra,
    ]  # fmt: skip


def _kill_tree(root: int) -> None:
    """SIGKILL ``root`` and everything it started (SuperLink, simulation, ServerApp, Ray):
    the coordinator crashes at once, without any chance to clean up."""
    for pid in [root, *descendants(root)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _history(client: MlflowClient, run_id: str, name: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, name))


def test_coordinator_killed_after_round_3_resumes_into_the_same_run(tmp_path: Path):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    for folder in (reference, crashed):
        folder.mkdir()
    # The uninterrupted run, alongside the crashed and resumed one (each with its own folder,
    # SuperLink on a free port and MLflow store): much of a run's start-up is waiting, so the
    # two overlap instead of queueing.
    with (reference / "run.out").open("w") as out:
        uninterrupted = subprocess.Popen(
            _command(reference / "work", "--set", "run-key=reference"),
            cwd=reference, env=_env(reference), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        _crash_then_resume(crashed)
    finally:
        try:
            uninterrupted.wait(timeout=900)
        except subprocess.TimeoutExpired:
            _kill_tree(uninterrupted.pid)
            uninterrupted.wait()
    assert uninterrupted.returncode == 0, (reference / "run.out").read_text()[-3000:]
    _assert_resumed_run_matches_the_uninterrupted_one(tmp_path, reference, crashed)


def _crash_then_resume(crashed: Path) -> None:
    # The same run, killed (ServerApp, SuperLink and simulation) once round 3 is checkpointed.
    work = crashed / "work"
    saved = checkpoint.checkpoint_path(str(work / "checkpoints"), "crashed")
    with (crashed / "first.out").open("w") as out:
        first = subprocess.Popen(
            _command(work, "--set", "run-key=crashed"),
            cwd=crashed, env=_env(crashed), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and first.poll() is None:
            if saved.exists() and checkpoint.load(saved)["round"] >= 3:
                break
            time.sleep(0.2)
        assert first.poll() is None, (crashed / "first.out").read_text()[-3000:]
        assert checkpoint.load(saved)["round"] == 3
    finally:
        _kill_tree(first.pid)
        first.wait()

    resumed = subprocess.run(
        _command(work, "--resume", "crashed"),
        cwd=crashed, env=_env(crashed), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming after round 3 of 4" in resumed.stdout + resumed.stderr, resumed.stdout


def _assert_resumed_run_matches_the_uninterrupted_one(
    tmp_path: Path, reference: Path, crashed: Path
) -> None:
    uri = f"sqlite:///{crashed / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("radfl").experiment_id])
    assert len(runs) == 1  # one MLflow run, continued
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["radfl.resumed-after-round"] == "3"
    # Every round logged exactly once (step 0: the untrained model, logged before the crash).
    assert _history(client, run.info.run_id, "pooled/loss") == list(range(ROUNDS + 1))
    assert _history(client, run.info.run_id, "train/loss") == list(range(1, ROUNDS + 1))

    reference_uri = f"sqlite:///{reference / 'mlflow.db'}"
    other = MlflowClient(reference_uri)
    expected = other.search_runs([other.get_experiment_by_name("radfl").experiment_id])[0]
    for name in ("pooled/loss", "test/auc"):
        assert run.data.metrics[name] == pytest.approx(expected.data.metrics[name], abs=0.05), name
    weights = []
    for source, finished, folder in ((client, run, "a"), (other, expected, "b")):
        (tmp_path / folder).mkdir()
        path = source.download_artifacts(
            finished.info.run_id, "weights/final.pt", str(tmp_path / folder)
        )
        weights.append(torch.load(path, weights_only=True))
    distance = (
        sum(float((weights[0][k].float() - weights[1][k].float()).norm() ** 2) for k in weights[0])
        ** 0.5
    )
    scale = sum(float(v.float().norm() ** 2) for v in weights[1].values()) ** 0.5
    assert distance < 0.05 * scale
