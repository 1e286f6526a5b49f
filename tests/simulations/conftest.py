"""What the end-to-end tests of real simulations share: the tiny federation they run, the
environment that points it at a fresh MLflow store, an app folder with a recording ClientApp,
and reading the run back from MLflow."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
RADFL = str(Path(sys.executable).parent / "radfl")
#: The smallest federation that still trains and reports (seconds a round on two cores).
TINY_SETTINGS: dict[str, Any] = {
    "image-size": 32,
    "synthetic-samples-per-site": 24,
    "batch-size": 8,
    "local-epochs": 1,
    "min-cell-size": 2,
}


def tracking_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def tracking_env(folder: Path, **extra: str) -> dict[str, str]:
    """This process's environment, tracking to ``folder/mlflow.db``, Flower quiet."""
    env = os.environ.copy()
    env.update(
        MLFLOW_TRACKING_URI=tracking_uri(folder),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        **extra,
    )
    return env


def set_options(settings: Mapping[str, Any]) -> list[str]:
    """``--set KEY=VALUE`` for each run-config value."""
    return [part for key, value in settings.items() for part in ("--set", f"{key}={value}")]


def tiny_simulate_command(*, sites: int, rounds: int, **settings: Any) -> list[str]:
    """``radfl simulate`` of ``small-cnn`` on in-memory sites of :data:`TINY_SETTINGS`
    (``settings`` override or add run-config values, by their Python names)."""
    values = {**TINY_SETTINGS, **{k.replace("_", "-"): v for k, v in settings.items()}}
    command = [RADFL, "simulate", "--in-memory", "--sites", str(sites), "--rounds", str(rounds)]
    return [*command, "--model", "small-cnn", *set_options(values)]


def run_radfl(
    command: list[str], folder: Path, env: Mapping[str, str], timeout_s: int = 900
) -> str:
    """Run ``command`` in ``folder``; its output (stdout then stderr), failing the test with the
    output's tail unless it exits 0."""
    done = subprocess.run(
        command, cwd=folder, env=dict(env), capture_output=True, text=True, timeout=timeout_s
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    return output


def app_with_clientapp(folder: Path, module: str, source: str) -> Path:
    """A copy of the project's app whose ClientApp is ``module:app`` (``source``), so that a
    test can wrap the production ClientApp in its own mods."""
    folder.mkdir(parents=True, exist_ok=True)
    pyproject = (REPO / "pyproject.toml").read_text()
    production = 'clientapp = "client.app:app"'
    assert production in pyproject
    (folder / "pyproject.toml").write_text(
        pyproject.replace(production, f'clientapp = "{module}:app"')
    )
    (folder / f"{module}.py").write_text(source)
    return folder


def the_run(folder: Path, mode: str | None = None) -> tuple[MlflowClient, Any]:
    """The MLflow client of ``folder/mlflow.db`` (also made the default tracking URI) and its
    one run of experiment ``radfl`` (of ``radfl.mode`` = ``mode`` when given)."""
    uri = tracking_uri(folder)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("radfl")
    query = f"tags.`radfl.mode` = '{mode}'" if mode else ""
    runs = client.search_runs([experiment.experiment_id], query)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def rejections(client: MlflowClient, run_id: str, folder: Path) -> pd.DataFrame:
    """The run's ``robustness/rejections.csv``."""
    path = client.download_artifacts(run_id, "robustness/rejections.csv", str(folder))
    return pd.read_csv(io.StringIO(Path(path).read_text()))


def metric_history(client: MlflowClient, run_id: str, name: str) -> dict[int, float]:
    """``{step: value}`` of metric ``name``."""
    return {m.step: m.value for m in client.get_metric_history(run_id, name)}
