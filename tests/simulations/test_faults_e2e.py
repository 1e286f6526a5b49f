"""A real Flower simulation of five sites where some misbehave (``RADFL_FAULTS``): every bad
reply is left out with its reason in MLflow, a round below quorum keeps the global model, and
the run completes with a finite model."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.simulations.test_simulate_e2e import RADFL, _client, _env, _only_run

pytestmark = pytest.mark.slow

FAULTS = ",".join(
    [
        "site-1:crash@1",  # round 1: a site crashes mid-round; the other 4 are aggregated
        "site-2:nan@2",  # round 2: 3 valid replies < quorum 4: the round fails
        "site-4:inflate@2",
        "site-3:scale@3",  # round 3: 4 valid replies
        "site-0:shape@4",  # round 4: 4 valid replies
    ]
)


def test_bad_replies_are_rejected_and_a_round_below_quorum_keeps_the_model(tmp_path: Path):
    env = {**_env(tmp_path), "RADFL_FAULTS": FAULTS}
    settings = {
        "image-size": 32,
        "synthetic-samples-per-site": 24,
        "batch-size": 8,
        "local-epochs": 1,
        "min-cell-size": 2,
        "min-replies": 4,
        "max-update-norm-ratio": 5.0,
    }
    overrides = [part for k, v in settings.items() for part in ("--set", f"{k}={v}")]
    command = [RADFL, "simulate", "--in-memory", "--sites", "5", "--rounds", "4"]
    command += ["--model", "small-cnn", *overrides]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    client = _client(tmp_path)
    run = _only_run(client, "federated")
    assert run.info.status == "FINISHED"

    def history(name: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}

    rejections = pd.read_csv(
        io.StringIO(
            Path(
                client.download_artifacts(
                    run.info.run_id, "robustness/rejections.csv", str(tmp_path)
                )
            ).read_text()
        )
    )
    sites = rejections.dropna(subset=["site"])
    reasons = {(r.round, r.site): r.reason for r in sites.itertuples()}
    assert "injected crash" in reasons[1, "site-1"]
    assert reasons[2, "site-2"].startswith("non-finite values in ")
    assert "num-examples" in reasons[2, "site-4"] and "declared" in reasons[2, "site-4"]
    assert "update norm" in reasons[3, "site-3"]
    assert "wrong weights" in reasons[4, "site-0"]
    assert len(reasons) == 5  # no benign reply was rejected

    assert history("round/failed") == {1: 0.0, 2: 1.0, 3: 0.0, 4: 0.0}
    assert history("train/sites") == {1: 4.0, 3: 4.0, 4: 4.0}  # round 2 aggregated nothing
    assert history("site/site-2/rejected-update") == {2: 1.0}
    # The failed round kept the global model: round 2 evaluated exactly round 1's model.
    loss = history("pooled/loss")
    assert loss[2] == loss[1] and loss[3] != loss[2]
    final = torch.load(
        client.download_artifacts(run.info.run_id, "weights/final.pt", str(tmp_path)),
        weights_only=True,
    )
    assert all(torch.isfinite(v.float()).all() for v in final.values())
    assert "update of site-3 rejected" in output and "round 2 failed" in output
