"""End to end: what leaves a site in a real simulation, leave-one-site-out, cross-site, report.

One simulation of three sites runs the project's ServerApp against the project's ClientApp
wrapped in a mod that writes every reply a site sends to a JSON-lines file. The test then checks
that the replies hold only weights, metric states of fixed size, counts of at least k, and
config; that the left-out site never trained; and that the report was logged and regenerates.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from common.report_files import FILES
from tests.simulations.conftest import (
    RADFL,
    app_with_clientapp,
    the_run,
    tracking_env,
)

K = 10
NUM_BINS = 2000
NUM_CLASSES = 2

pytestmark = pytest.mark.slow

RECORDING_CLIENT = '''
"""The RadFL ClientApp with a mod that records every reply this site sends."""
import json
import os

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from client.app import build_app


def _describe(record):
    if isinstance(record, ArrayRecord):
        return {"type": "arrays", "shapes": {k: list(v.shape) for k, v in record.items()}}
    if isinstance(record, MetricRecord):
        return {"type": "metrics", "values": dict(record)}
    if isinstance(record, ConfigRecord):
        return {"type": "config", "values": dict(record)}
    return {"type": type(record).__name__}


def record_replies(msg, context, call_next):
    reply = call_next(msg, context)
    entry = {
        "message_type": msg.metadata.message_type,
        "partition": context.node_config.get("partition-id"),
        "error": reply.has_error(),
        "records": {} if reply.has_error() else {
            name: _describe(record) for name, record in reply.content.items()
        },
    }
    with open(os.environ["RADFL_RECORD_REPLIES"], "a") as log:
        log.write(json.dumps(entry) + "\\n")
    return reply


app = build_app(mods=[record_replies])
'''


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report-e2e")
    app_dir = app_with_clientapp(tmp_path / "app", "recording_client", RECORDING_CLIENT)
    replies = tmp_path / "replies.jsonl"
    env = tracking_env(tmp_path, RADFL_RECORD_REPLIES=str(replies))
    command = [
        RADFL,
        "simulate",
        "--app-dir",
        str(app_dir),
        "--sites",
        "3",
        "--rounds",
        "2",
        "--model",
        "small-cnn",
        "--leave-out",
        "site-2",
        "--cross-site",
        "--set",
        "image-size=32",
        "--set",
        "synthetic-samples-per-site=200",
        "--set",
        "local-epochs=1",
        "--set",
        f"min-cell-size={K}",
    ]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    lines = [json.loads(line) for line in replies.read_text().splitlines()]
    client, run = the_run(tmp_path)
    return {
        "stdout": done.stdout,
        "replies": lines,
        "client": client,
        "run": run,
        "env": env,
        "tmp": tmp_path,
    }


def test_sites_send_only_weights_fixed_size_states_counts_of_at_least_k_and_config(recorded_run):
    replies = recorded_run["replies"]
    assert not any(r["error"] for r in replies)
    kinds = {r["message_type"] for r in replies}
    assert kinds == {"query", "train", "evaluate", "evaluate.final", "train.local"}
    state_sizes = {
        "state.histogram": NUM_CLASSES * 2 * NUM_BINS,
        "state.confusion": NUM_CLASSES * NUM_CLASSES,
        "state.loss_sum": 1,
        "state.count": 1,
        # The trust states (common.calibration, common.selective, common.attention)
        "state.calibration_nll": 33,
        "state.calibration_counts": 33 * 10,
        "state.calibration_sums": 33 * 10 * 2,
        "state.selective": 20 * 2 * 100,
        "state.attention": 3,
    }
    counts = {"num-examples", "patients", "train-images", "validation-images", "test-images"}
    summaries = {"train-loss", "validation-loss", "epochs-run", "skipped-steps"}
    cell = re.compile(r"^(validation|test)/[a-z_]+=.+$")
    checked_states = 0
    for reply in replies:
        for name, record in reply["records"].items():
            if record["type"] == "arrays":
                assert name == "arrays"
                assert reply["message_type"] in ("train", "train.local")
                continue
            if record["type"] == "config":
                assert name in ("site", "suppressed", "refused")
                for key, value in record["values"].items():
                    if name == "site":
                        assert key == "site-name" and isinstance(value, str)
                    elif name == "refused":  # attention on fewer than k lesion cases
                        assert key == "attention_in_lesion"
                        assert value.startswith(f"withheld where fewer than k = {K} cases")
                    else:
                        assert key in ("validation", "test")
                        assert all(re.match(r"^[a-z_]+=.+$", c) for c in value)
                continue
            assert record["type"] == "metrics", record["type"]
            assert name in ("metrics", "validation", "test") or cell.match(name), name
            for key, value in record["values"].items():
                if key in state_sizes:
                    # Fixed size whatever the number of patients: nothing per patient.
                    size = len(value) if isinstance(value, list) else 1
                    assert size == state_sizes[key], (name, key)
                    checked_states += 1
                elif key in counts:
                    assert value >= K, (reply["message_type"], name, key, value)
                elif key == "skipped-rows":
                    assert value == 0
                else:
                    assert key in summaries, (name, key)
                    assert not isinstance(value, list)
    assert checked_states > 0
    # The state count of every subgroup cell is at least k too, and so is the count of
    # cases behind every attention state that is sent.
    for reply in replies:
        for name, record in reply["records"].items():
            if cell.match(name):
                assert record["values"]["state.count"][0] >= K
            if record["type"] == "metrics" and "state.attention" in record["values"]:
                cases = record["values"]["state.attention"][0]
                assert cases == 0 or cases >= K, (name, cases)


def test_the_report_carries_calibration_selective_prediction_and_attention(recorded_run):
    client, run = recorded_run["client"], recorded_run["run"]
    metrics = run.data.metrics
    assert metrics["test/temperature"] > 0
    assert 0 <= metrics["test/ece-after"] <= 1 and 0 <= metrics["test/ece-before"] <= 1
    download = recorded_run["tmp"] / "trust-dl"
    trust = pd.read_csv(client.download_artifacts(run.info.run_id, "report/trust.csv", download))
    pooled = trust.set_index("population").loc["pooled"]
    assert pooled["ece_before"] == pytest.approx(metrics["test/ece-before"], rel=1e-5)
    assert {"site-0", "site-1", "site-2"} <= set(trust["population"])
    assert any("=" in population for population in trust["population"])  # subgroups
    selective = pd.read_csv(
        client.download_artifacts(run.info.run_id, "report/selective.csv", download)
    )
    curve = selective[selective["population"] == "pooled"]
    assert curve["referred_share"].iloc[0] == 0 and curve["kept"].iloc[0] == pooled["n"]
    assert curve["referred_share"].is_monotonic_increasing
    names = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/calibration_before_after.png", "report/selective.png"} <= names
    # Attention inside the lesion: a number where k lesion cases stand behind it, else
    # withheld by the site's message (a 2-round model's Grad-CAM is often empty).
    refused = [r for r in recorded_run["replies"] if "refused" in r["records"]]
    assert trust["attention_cases"].max() >= K or refused
    card = client.download_artifacts(run.info.run_id, "report/model_card.md", download)
    assert "Calibration, uncertainty and attention" in Path(card).read_text()


def test_left_out_site_never_trains_and_is_reported_as_external(recorded_run):
    replies = recorded_run["replies"]
    trained = {r["partition"] for r in replies if r["message_type"] == "train"}
    evaluated = {r["partition"] for r in replies if r["message_type"] == "evaluate"}
    assert trained == {0, 1} and evaluated == {0, 1, 2}
    client, run = recorded_run["client"], recorded_run["run"]
    assert len(client.get_metric_history(run.info.run_id, "external/site-2/loss")) == 3  # 0, 1, 2
    assert client.get_metric_history(run.info.run_id, "site/site-2/train-loss") == []
    sites = pd.read_csv(client.download_artifacts(run.info.run_id, "report/sites.csv"))
    roles = dict(zip(sites["site"], sites["role"], strict=True))
    assert roles["site-2"].startswith("external") and roles["site-0"] == "training"


def test_report_is_logged_with_test_metrics_and_cross_site_matrix(recorded_run):
    client, run = recorded_run["client"], recorded_run["run"]
    names = {
        a.path.removeprefix("report/") for a in client.list_artifacts(run.info.run_id, "report")
    }
    assert set(FILES) | {"sites_by_round.csv", "cross_site.csv"} <= names
    metrics = run.data.metrics
    assert metrics["test/auc-low"] <= metrics["test/auc"] <= metrics["test/auc-high"]
    assert 0.0 <= metrics["test/threshold"] <= 1.0
    matrix = pd.read_csv(client.download_artifacts(run.info.run_id, "report/cross_site.csv"))
    assert sorted(matrix["model"]) == ["federated", "local:site-0", "local:site-1", "local:site-2"]
    assert {"site-0", "site-1", "site-2"} <= set(matrix.columns)
    by_round = pd.read_csv(client.download_artifacts(run.info.run_id, "report/sites_by_round.csv"))
    assert sorted(set(by_round["round"])) == [1, 2] and set(by_round["site"]) == {
        "site-0",
        "site-1",
        "site-2",
    }
    assert "Test split, final model" in recorded_run["stdout"]


def test_radfl_report_regenerates_the_logged_report(recorded_run):
    client, run, tmp = recorded_run["client"], recorded_run["run"], recorded_run["tmp"]
    out = tmp / "regenerated"
    done = subprocess.run(
        [RADFL, "report", run.info.run_id, "--out", str(out)],
        cwd=tmp,
        env=recorded_run["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    trust_files = {"trust.csv", "selective.csv", "calibration_before_after.png", "selective.png"}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        set(FILES) | {"cross_site.csv"} | trust_files
    )
    for name in ("metrics.csv", "subgroups.csv", "sites.csv"):
        logged = client.download_artifacts(run.info.run_id, f"report/{name}", str(tmp / "dl"))
        assert (out / name).read_text() == Path(logged).read_text(), name
    assert "Test split, final model" in done.stdout

    missing = subprocess.run(
        [RADFL, "report", "0123456789abcdef"],
        cwd=tmp,
        env=recorded_run["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and "0123456789abcdef" in missing.stderr
