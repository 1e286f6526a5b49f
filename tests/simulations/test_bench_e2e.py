"""`radfl bench --profile quick`: every part runs real simulations and writes its tables, each
number traceable to its MLflow run (the privacy part has its own test, in test_attacks.py).

The parts run as two ``radfl bench`` processes, one per test module (this one: ``quality``;
test_bench_cost_e2e.py: ``comm``, ``overhead``, ``scale``), so that a parallel test run
(``make test``: pytest-xdist, a module per worker) does not queue nine simulations behind one
another in a single test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

RADFL = str(Path(sys.executable).parent / "radfl")

pytestmark = pytest.mark.slow


def run_bench(tmp_path: Path, parts: list[str]) -> tuple[Path, str, MlflowClient]:
    """``radfl bench --profile quick --parts PARTS`` into ``tmp_path/bench``: the folder, the
    output and a client of the MLflow store the runs went to; each part's table and its
    printed section are there."""
    out = tmp_path / "bench"
    done = subprocess.run(
        [RADFL, "bench", "--profile", "quick", "--parts", ",".join(parts), "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    tables = [*parts, *(f"{part}_summary" for part in parts if part == "quality")]
    for table_name in tables:
        assert f"## {table_name.split('_')[0]}" in done.stdout
        table = pd.read_csv(out / f"{table_name}.csv")
        assert len(table) and json.loads((out / f"{table_name}.json").read_text())
    return out, done.stdout, MlflowClient(f"sqlite:///{out / 'mlflow.db'}")


def assert_traceable(client: MlflowClient, run_ids: pd.Series) -> None:
    """Every number traces back to a finished MLflow run."""
    for run_id in run_ids.unique():
        assert client.get_run(run_id).info.status == "FINISHED"


def test_quick_quality_compares_pooled_federated_and_local_with_traceable_runs(tmp_path: Path):
    out, _, client = run_bench(tmp_path, ["quality"])
    quality = pd.read_csv(out / "quality.csv")
    assert set(quality["training"]) == {
        "pooled",
        "fedavg",
        "local-only (mean of sites)",
        "federated (same view)",
    }
    assert set(quality["task"]) == {"classification", "segmentation"}
    assert quality["value"].between(0, 1).all()
    assert_traceable(client, quality["run_id"])
    summary = pd.read_csv(out / "quality_summary.csv")
    pooled = summary[summary["training"] == "pooled"]
    assert (pooled["x_pooled"] == 1.0).all()
    assert summary["gain_over_local"].notna().sum() == 2  # one per task
