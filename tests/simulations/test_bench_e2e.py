"""`radfl bench --profile quick`: every part runs real simulations and writes its tables
(the privacy part has its own test, in test_attacks.py)."""

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


def test_quick_profile_writes_every_part_with_traceable_runs(tmp_path: Path):
    out = tmp_path / "bench"
    done = subprocess.run(
        [RADFL, "bench", "--profile", "quick", "--parts", "quality,overhead,scale,comm"]
        + ["--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for part in ("quality", "quality_summary", "overhead", "scale", "comm"):
        assert f"## {part.split('_')[0]}" in done.stdout
        table = pd.read_csv(out / f"{part}.csv")
        assert len(table) and json.loads((out / f"{part}.json").read_text())

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    quality = pd.read_csv(out / "quality.csv")
    assert set(quality["training"]) == {
        "pooled",
        "fedavg",
        "local-only (mean of sites)",
        "federated (same view)",
    }
    assert set(quality["task"]) == {"classification", "segmentation"}
    assert quality["value"].between(0, 1).all()
    for run_id in quality["run_id"].unique():  # every number traces back to an MLflow run
        assert client.get_run(run_id).info.status == "FINISHED"
    summary = pd.read_csv(out / "quality_summary.csv")
    pooled = summary[summary["training"] == "pooled"]
    assert (pooled["x_pooled"] == 1.0).all()
    assert summary["gain_over_local"].notna().sum() == 2  # one per task

    comm = pd.read_csv(out / "comm.csv").set_index("compression")
    assert comm.loc["int8", "bytes_per_site_round"] < 0.5 * comm.loc["none", "bytes_per_site_round"]
    assert comm.loc["none", "x_fp32"] == pytest.approx(1.0, abs=0.05)

    overhead = pd.read_csv(out / "overhead.csv")
    # One repeat: the whole run and one round against the bare loop, then fp32 and bf16 epochs.
    assert len(overhead) == 4 and (overhead["ratio"] > 0).all()
    one_round = overhead[overhead["measure"].str.startswith("one round")]
    assert len(one_round) == 1 and one_round["radfl_s"].iloc[0] > 0
    scale = pd.read_csv(out / "scale.csv")
    assert list(scale["sites"]) == [2, 4] and (scale["peak_memory_mb"] > 0).all()
