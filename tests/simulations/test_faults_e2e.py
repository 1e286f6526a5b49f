"""A real Flower simulation of five sites where some misbehave (``radfl simulate --faults``, the
simulation-only ClientApp of ``simulations.faults``): every bad reply is left out with its
reason in MLflow, a round below quorum keeps the global model, and the run completes with a
finite model."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from simulations.local_superlink import descendants
from tests.simulations.conftest import (
    metric_history,
    rejections,
    run_radfl,
    the_run,
    tiny_simulate_command,
    tracking_env,
)

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


def _final_weights(client, run, folder: Path) -> dict[str, torch.Tensor]:
    folder.mkdir()
    path = client.download_artifacts(run.info.run_id, "weights/final.pt", str(folder))
    return torch.load(path, weights_only=True)


def test_bad_replies_are_rejected_and_a_round_below_quorum_keeps_the_model(tmp_path: Path):
    benign_dir, faulty_dir = tmp_path / "benign", tmp_path / "faulty"
    benign_dir.mkdir()
    faulty_dir.mkdir()
    command = tiny_simulate_command(sites=5, rounds=4, min_replies=4, max_update_norm_ratio=5.0)
    # The same federation without faults, for comparison, alongside the faulty one (each with
    # its own folder and MLflow store): much of a run is start-up waiting, so they overlap.
    with (benign_dir / "run.out").open("w") as log:
        benign = subprocess.Popen(
            command, cwd=benign_dir, env=tracking_env(benign_dir), stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        output = run_radfl([*command, "--faults", FAULTS], faulty_dir, tracking_env(faulty_dir))
        benign.wait(timeout=900)
    finally:
        if benign.poll() is None:  # the faulty run failed: stop the benign one and its Ray
            for pid in [*descendants(benign.pid), benign.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            benign.wait()
    assert benign.returncode == 0, (benign_dir / "run.out").read_text()[-5000:]
    tmp_path = faulty_dir
    client, run = the_run(tmp_path, "federated")
    assert run.info.status == "FINISHED"

    def history(name: str) -> dict[int, float]:
        return metric_history(client, run.info.run_id, name)

    sites = rejections(client, run.info.run_id, tmp_path).dropna(subset=["site"])
    reasons = {(r.round, r.site): r.reason for r in sites.itertuples()}
    # A crash reaches the coordinator as its code and category only, never its text.
    assert "site app failed (E-INTERNAL): RuntimeError" in reasons[1, "site-1"]
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
    assert loss[2] == pytest.approx(loss[1], rel=1e-9) and loss[3] != pytest.approx(
        loss[2], rel=1e-6
    )
    final = _final_weights(client, run, tmp_path / "final")
    assert all(torch.isfinite(v.float()).all() for v in final.values())
    # Close to the benign run's model: the rejected replies never reached the average.
    benign_client, benign_run = the_run(benign_dir, "federated")
    reference = _final_weights(benign_client, benign_run, tmp_path / "b")
    floats = [k for k in final if final[k].is_floating_point()]
    distance = sum(float((final[k] - reference[k]).norm() ** 2) for k in floats) ** 0.5
    scale = sum(float(reference[k].norm() ** 2) for k in floats) ** 0.5
    print(f"relative distance to the benign run's model: {distance / scale:.4f}")
    assert distance < 0.2 * scale  # measured 0.085; one x100 update alone would be far above 1
    assert "update of site-3 rejected" in output and "round 2 failed" in output
