"""A real Flower simulation with ``secure-aggregation = true`` (SecAgg+; server/secagg.py).

One simulation (3 tiny synthetic hospitals on disk, 4 rounds, ``small-cnn``), with faults
injected at the sites (``simulations.faults``) and the test-only transcripts of what the server
received and of each site's true update before masking (``RADFL_SECAGG_TEST_TRANSCRIPT``):

- round 1: every site takes part;
- round 2: ``site-2`` crashes after key sharing (in the masked-vector stage): 2 sites remain;
- round 3: ``site-1`` and ``site-2`` crash there: too few remain to unmask, the round fails;
- round 4: ``site-0`` sends ``global + 100 * update``, which its own bound refuses.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.simulations.test_simulate_e2e import RADFL, _client, _env, _only_run

pytestmark = pytest.mark.slow

FAULTS = "site-2:crash@2,site-1:crash@3,site-2:crash@3,site-0:scale@4"
CLIPPING_RANGE = 100.0  # pyproject's secagg-clipping-range
QUANTIZATION_STEPS = 2**24  # server.secagg.QUANTIZATION_RANGE


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("secagg")
    data = folder / "hospitals"
    done = subprocess.run(
        [RADFL, "synth", "--out", str(data), "--sites", "3", "--samples-per-site", "24"]
        + ["--image-size", "32", "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    settings = {
        "image-size": 32,
        "batch-size": 8,
        "local-epochs": 1,
        "min-cell-size": 2,
        "secure-aggregation": "true",
        # Tighter than the default 10: these sites' honest updates stay below 1x the global
        # model's norm, and site-0's 100x update in round 4 must exceed it.
        "secagg-max-update-norm-ratio": 1.0,
        "run-key": "secure-run",
    }
    overrides = [part for k, v in settings.items() for part in ("--set", f"{k}={v}")]
    command = [RADFL, "simulate", "--data", str(data), "--sites", "3", "--rounds", "4"]
    command += ["--model", "small-cnn", *overrides]
    transcript = folder / "transcript"
    env = {
        **_env(folder),
        "RADFL_FAULTS": FAULTS,
        "RADFL_SECAGG_TEST_TRANSCRIPT": str(transcript),
    }
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    client = _client(folder)
    run = _only_run(client, "federated")
    path = client.download_artifacts(run.info.run_id, "robustness/rejections.csv", str(folder))
    rejections = pd.read_csv(io.StringIO(Path(path).read_text()))
    return {
        "client": client,
        "run": client.get_run(run.info.run_id),
        "output": output,
        "data": data,
        "transcript": transcript,
        "rejections": {(r.round, r.site): r.reason for r in rejections.itertuples()},
    }


def _history(secure_run: dict[str, Any], name: str) -> dict[int, float]:
    client, run = secure_run["client"], secure_run["run"]
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}


def _true_updates(transcript: Path, server_round: int) -> dict[str, Any]:
    return {
        path.name.split("-update")[0].split(f"round-{server_round}-")[1]: np.load(path)
        for path in sorted(transcript.glob(f"round-{server_round}-site-*-update.npz"))
    }


def test_the_secure_run_completes_and_trains(secure_run):
    assert secure_run["run"].info.status == "FINISHED"
    assert _history(secure_run, "train/sites") == {1: 3.0, 2: 2.0, 4: 2.0}  # 3 failed
    assert _history(secure_run, "round/failed") == {1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0}
    assert "test/auc" in secure_run["run"].data.metrics  # the final report was written
    aggregate = np.load(secure_run["transcript"] / "round-1-aggregate.npz")
    assert sum(float(np.abs(aggregate[k]).sum()) for k in aggregate.files) > 0  # it moved


@pytest.mark.parametrize("server_round", [1, 2])
def test_the_unmasked_aggregate_is_the_weighted_mean_of_the_true_updates(secure_run, server_round):
    updates = _true_updates(secure_run["transcript"], server_round)
    # Round 2: site-2 crashed before it computed an update, the mean is the other two's.
    assert sorted(updates) == (["site-0", "site-1", "site-2"] if server_round == 1 else
                               ["site-0", "site-1"])  # fmt: skip
    aggregate = np.load(secure_run["transcript"] / f"round-{server_round}-aggregate.npz")
    weights = {site: float(u["__num_examples"]) for site, u in updates.items()}
    # max-weight: the largest training split the sites declared, all trained on in round 1.
    first = _true_updates(secure_run["transcript"], 1).values()
    max_weight = max(float(u["__num_examples"]) for u in first)
    # Stochastic rounding moves each weighted value by less than one quantization step.
    step = 2 * CLIPPING_RANGE / QUANTIZATION_STEPS
    tolerance = len(updates) * step / (sum(weights.values()) / max_weight) + 1e-9
    for name in aggregate.files:
        mean = sum(weights[s] * u[name] for s, u in updates.items()) / sum(weights.values())
        assert np.abs(aggregate[name] - mean).max() <= tolerance, name


def test_the_curious_server_receives_no_site_update(secure_run):
    received = json.loads((secure_run["transcript"] / "round-1.json").read_text())
    assert {entry["stage"] for entry in received} == {
        "setup",
        "share keys",
        "collect masked vectors",
        "unmask",
    }
    for entry in received:  # no weights in any record of any stage
        assert all(record["arrays"] == 0 for record in entry["records"].values()), entry
    masked = np.load(secure_run["transcript"] / "round-1-masked.npz")
    updates = _true_updates(secure_run["transcript"], 1)
    correlated = 0
    for site, update in updates.items():
        for index, name in enumerate(update.files[:-1]):  # the last is __num_examples
            vector = masked[f"{site}/{index + 1}"].astype(np.float64)  # 0: the weight
            assert vector.shape == update[name].shape
            if vector.size < 100:
                continue
            # Unmasked, the quantized update lies in [0, 2**22); masked, it is uniform over
            # [0, 2**32) and says nothing of the update.
            assert (vector >= QUANTIZATION_STEPS).mean() > 0.9, (site, name)
            if vector.size < 2000:  # chance alone gives |r| >= 0.2 in 5% of 100-value arrays
                continue
            # At 2000 values chance correlation has standard deviation 0.022: 0.2 is 9 of them.
            correlation = np.corrcoef(vector.ravel(), update[name].ravel())[0, 1]
            assert abs(correlation) < 0.2, (site, name, correlation)
            correlated += 1
    assert correlated >= 3, "no array large enough to test the masks' correlation"


def test_one_site_dropping_after_key_sharing_still_completes_the_round(secure_run):
    assert secure_run["rejections"][2, "site-2"].startswith("error reply (site app failed")
    assert "[radfl] round 2: secure aggregate of 2 sites" in secure_run["output"]


def test_too_many_dropping_fail_the_round_with_a_clear_error(secure_run):
    reason = secure_run["rejections"][3, "secure-aggregation"]
    assert reason.startswith(
        "secure aggregation failed at stage 'collect masked vectors': 1 of 3 sites still take "
        "part, and each site needs at least 2 live neighbours of 3"
    )
    assert "the global model is kept" in reason


def test_a_site_whose_update_exceeds_its_bound_refuses_with_its_code(secure_run):
    reason = secure_run["rejections"][4, "site-0"]
    assert "(E-SECAGG-NORM): bound secagg-max-update-norm-ratio" in reason
    assert "[radfl] round 4: secure aggregate of 2 sites" in secure_run["output"]


def test_the_site_audit_log_records_keys_shares_and_masked_vectors(secure_run):
    folder = secure_run["data"] / "site-0" / ".radfl-logs" / "audit"
    (log,) = folder.glob("run-*.jsonl")
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    sent: dict[str, int] = {}
    for entry in entries:
        if entry["message_type"] != "train" or entry["error"]:
            continue
        records = entry["records"]
        for record in records.values():  # weights never leave under SecAgg
            assert record["kind"] != "arrays" or record["fields"] == {}, records
        for field, described in records["secaggplus_configs"]["fields"].items():
            sent[field] = sent.get(field, 0) + described["bytes"]
    assert {"pk1", "pk2", "ctxts", "masked_params", "shares"} <= set(sent)
    assert all(sent[field] > 0 for field in ("pk1", "ctxts", "masked_params", "shares"))
