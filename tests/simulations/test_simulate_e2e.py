"""End to end: real Flower simulation runs, read back from the MLflow store they wrote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from simulations.local_superlink import free_port

REPO = Path(__file__).resolve().parents[2]
RADFL = str(Path(sys.executable).parent / "radfl")
TINY = [
    "--set",
    "image-size=32",
    "--set",
    "synthetic-samples-per-site=120",
    "--set",
    "batch-size=8",
]

pytestmark = pytest.mark.slow


def _env(tmp_path: Path) -> dict[str, str]:
    env = os.environ.copy()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    return env


def _client(tmp_path: Path) -> MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def _only_run(client: MlflowClient, mode: str):
    experiment = client.get_experiment_by_name("radfl")
    runs = client.search_runs([experiment.experiment_id], f"tags.`radfl.mode` = '{mode}'")
    assert len(runs) == 1
    return runs[0]


def test_simulate_two_sites_two_rounds_is_tracked_in_mlflow(tmp_path: Path):
    """Through a private SuperLink and `flwr run` (`--superlink`), as a deployment runs the
    apps; every other end-to-end test runs the federation in radfl's own process."""
    command = [
        RADFL,
        "simulate",
        "--superlink",
        "--sites",
        "2",
        "--rounds",
        "2",
        "--model",
        "small-cnn",
        "--seed",
        "7",
        *TINY,
    ]
    done = subprocess.run(
        command, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # Progress and the summary table are shown.
    assert "[radfl] round 1/2" in done.stdout and "[radfl] round 2/2" in done.stdout
    assert "Per-site validation auc" in done.stdout and "Wall time" in done.stdout

    client = _client(tmp_path)
    run = _only_run(client, "federated")
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "small-cnn"
    assert run.data.params["num_rounds"] == "2"
    assert run.data.params["seed"] == "7"
    # The sites' training config is logged too, as the sites resolved it.
    assert run.data.params["batch_size"] == "8" and run.data.params["optimizer"] == "adamw"
    assert run.info.run_id in done.stdout

    # Site 0 has the lowest prevalence: its tiny validation split may hold no positive (AUC
    # undefined, so not logged); the loss is always defined.
    # Step 0: the untrained model, evaluated at every site before the first round.
    for name in ("pooled/auc", "pooled/loss", "train/loss", "site/site-1/auc", "site/site-0/loss"):
        history = client.get_metric_history(run.info.run_id, name)
        expected = [1, 2] if name.startswith("train/") else [0, 1, 2]
        assert sorted(m.step for m in history) == expected, name
    site_examples = sum(
        client.get_metric_history(run.info.run_id, f"site/site-{i}/num-examples")[0].value
        for i in range(2)
    )
    assert (
        client.get_metric_history(run.info.run_id, "train/num-examples")[0].value == site_examples
    )

    weights = {a.path for a in client.list_artifacts(run.info.run_id, "weights")}
    assert {"weights/final.pt", "weights/best.pt", "weights/model.json"} <= weights
    final = torch.load(
        client.download_artifacts(run.info.run_id, "weights/final.pt", str(tmp_path)),
        weights_only=True,
    )
    assert all(torch.isfinite(v.float()).all() for v in final.values())

    versions = client.search_model_versions("name = 'radfl-classification-small-cnn-2d'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    model = mlflow.pytorch.load_model(
        f"models:/radfl-classification-small-cnn-2d/{versions[0].version}"
    )
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 2)

    # The SuperLink and everything it started are gone.
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


def test_centralized_uses_the_same_sites_and_tracks_a_run(tmp_path: Path):
    command = [RADFL, "centralized", "--sites", "2", "--rounds", "2", "--model", "small-cnn", *TINY]
    done = subprocess.run(
        command, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    client = _client(tmp_path)
    run = _only_run(client, "centralized")
    history = client.get_metric_history(run.info.run_id, "pooled/auc")
    assert sorted(m.step for m in history) == [0, 1, 2]
    # The same end-of-run report as a federated run, from the same sites' test splits.
    report = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/metrics.csv", "report/subgroups.csv", "report/model_card.md"} <= report
    assert "test/auc" in run.data.metrics
    assert "Test split, final model" in done.stdout


def test_bad_run_config_key_fails_before_starting(tmp_path: Path):
    done = subprocess.run(
        [RADFL, "simulate", "--set", "num-roundz=2"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "num-roundz" in done.stderr


def _managed_superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of the SuperLink that `flwr run` started for this FLWR_HOME (its log is under it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmdline and str(flwr_home) in cmdline:
            pids.append(int(proc.name))
    return pids


def test_flwr_run_from_repository_root(tmp_path: Path):
    """`flwr run . --stream` runs the same apps in Flower's own managed simulation."""
    env = _env(tmp_path)
    flwr_home = tmp_path / "flwr-home"
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    config = "num-rounds=1 model='small-cnn' image-size=32 synthetic-samples-per-site=32"
    try:
        done = subprocess.run(
            ["flwr", "run", ".", "--stream", "--run-config", config],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        for pid in _managed_superlink_pids(flwr_home):
            os.kill(pid, signal.SIGTERM)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[radfl] round 1/1" in done.stdout + done.stderr
    run = _only_run(_client(tmp_path), "federated")
    assert run.info.status == "FINISHED"
