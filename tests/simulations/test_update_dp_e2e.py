"""End to end: update-level DP in a real simulation, seen from the server's side.

Two in-memory sites, small CNN, four rounds asked for with a budget that affords two. The
ClientApp is wrapped in a test mod that writes, for every training message, the weights the
site received and the weights that left it (what the server got): the attacker's view.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.common.test_privacy import _epsilon

REPO = Path(__file__).resolve().parents[2]
RADFL = str(Path(sys.executable).parent / "radfl")
NOISE, CLIP, DELTA = 1.0, 0.1, 1e-5

pytestmark = pytest.mark.slow

RECORDING_CLIENT = '''
"""The RadFL ClientApp, with a test mod writing each training exchange as it travels."""
import os

import numpy as np

from client.app import build_app

OUT = os.environ["RADFL_UPDATE_DP_RECORD"]


def record(msg, context, call_next):
    reply = call_next(msg, context)
    if msg.metadata.message_type == "train" and not reply.has_error():
        site = int(context.node_config["partition-id"])
        config = msg.content["config"]
        sent = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        back = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        name = f"site-{site}-round-{int(config['server-round'])}.npz"
        np.savez(
            os.path.join(OUT, name),
            clip=np.array(float(config["clipping_norm"])),
            **{f"sent/{k}": v for k, v in sent.items()},
            **{f"back/{k}": v for k, v in back.items()},
        )
    return reply


app = build_app(mods=[record])
'''


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("update-dp-e2e")
    app_dir = tmp / "app"
    app_dir.mkdir()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'clientapp = "client.app:app"' in pyproject
    (app_dir / "pyproject.toml").write_text(
        pyproject.replace('clientapp = "client.app:app"', 'clientapp = "recording_client:app"')
    )
    (app_dir / "recording_client.py").write_text(RECORDING_CLIENT)
    record = tmp / "record"
    record.mkdir()
    budget = (_epsilon([(NOISE, 1.0, 2)], DELTA) + _epsilon([(NOISE, 1.0, 3)], DELTA)) / 2
    env = os.environ.copy()
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RADFL_UPDATE_DP_RECORD=str(record),
    )
    settings = {
        "image-size": 32,
        "synthetic-samples-per-site": 60,
        "local-epochs": 1,
        "batch-size": 8,
        "min-cell-size": 2,
        "dp-update-noise-multiplier": NOISE,
        "dp-update-clip-norm": CLIP,
        "dp-update-epsilon": round(budget, 4),
        "dp-delta": DELTA,
        "final-model": "last",
    }
    command = [RADFL, "simulate", "--app-dir", str(app_dir), "--in-memory", "--sites", "2"]
    command += ["--rounds", "4", "--model", "small-cnn"]
    command += [part for k, v in settings.items() for part in ("--set", f"{k}={v}")]
    done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("radfl").experiment_id])
    return {"output": output, "client": client, "run": run, "record": record, "tmp": tmp}


def test_site_level_epsilon_is_logged_every_round_and_matches_an_independent_accountant(dp_run):
    client, run = dp_run["client"], dp_run["run"]
    history = client.get_metric_history(run.info.run_id, "dp-update/epsilon")
    values = {m.step: m.value for m in history}
    assert sorted(values) == [1, 2]
    for rounds, value in values.items():
        assert value == pytest.approx(_epsilon([(NOISE, 1.0, rounds)], DELTA), rel=0.01)
    assert "at delta 1e-05" in run.data.tags["radfl.dp-update-epsilon"]
    # The report carries it too.
    local = client.download_artifacts(run.info.run_id, "report/dp_update.json", str(dp_run["tmp"]))
    summary = json.loads(Path(local).read_text())
    assert summary["rounds"] == 2 and summary["stopped-by-budget"] is True
    assert summary["epsilon"] == pytest.approx(values[2])
    assert summary["sampled-sites"] == 2 and summary["sample-rate"] == 1.0


def test_the_budget_stops_training_before_the_round_that_would_pass_it(dp_run):
    output, run = dp_run["output"], dp_run["run"]
    assert "[radfl] update-level DP budget reached: training stops after round 2 of 4" in output
    assert run.data.tags["radfl.dp-update-budget-stop"].startswith("after round 2 of 4")
    assert run.info.status == "FINISHED"
    assert "test/auc" in run.data.metrics  # the final evaluation still ran
    # No site was asked to train a third time.
    assert sorted(p.name for p in dp_run["record"].glob("site-0-*")) == [
        "site-0-round-1.npz",
        "site-0-round-2.npz",
    ]


def test_what_the_server_received_from_each_site_is_clipped(dp_run):
    files = sorted(dp_run["record"].glob("*.npz"))
    assert len(files) == 4
    for path in files:
        with np.load(path) as saved:
            assert float(saved["clip"]) == CLIP
            sent = [k.split("/", 1)[1] for k in saved.files if k.startswith("sent/")]
            norm = np.sqrt(
                sum(
                    np.sum((saved[f"back/{k}"].astype(np.float64) - saved[f"sent/{k}"]) ** 2)
                    for k in sent
                )
            )
            assert 0 < norm <= CLIP * (1 + 1e-5), (path.name, norm)
            # GroupNorm network: no BatchNorm statistics travel.
            assert not any("running_mean" in k for k in sent)
