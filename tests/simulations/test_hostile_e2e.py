"""A real Flower simulation with hostile sites (issue 18): each value a hostile site was
seen to send ends nothing and moves nothing; the run completes with the honest sites' model.

One simulation (5 tiny sites, 2 rounds, ``small-cnn``); each reported case is its own test:

- ``site-2`` claims to be ``ghost`` with 1e12 examples in round 1, then 1e308 in round 2;
- ``site-3`` declares an infinite training split in the join query;
- ``site-4`` calls itself ``../site-4`` in the join query.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.simulations.conftest import (
    metric_history,
    rejections,
    run_radfl,
    the_run,
    tiny_simulate_command,
    tracking_env,
)

pytestmark = pytest.mark.slow

FAULTS = "site-2:ghost@1,site-2:overflow@2,site-3:inf-query,site-4:dots"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("hostile")
    command = tiny_simulate_command(sites=5, rounds=2)
    output = run_radfl(command, folder, tracking_env(folder, RADFL_FAULTS=FAULTS))
    client, run = the_run(folder, "federated")
    rejected = rejections(client, run.info.run_id, folder)
    weights = client.download_artifacts(run.info.run_id, "weights/final.pt", str(folder))
    return {
        "client": client,
        "run": client.get_run(run.info.run_id),
        "output": output,
        "rejections": {(r.round, r.site): r.reason for r in rejected.itertuples()},
        "final": torch.load(weights, weights_only=True),
    }


def _history(hostile_run: dict[str, Any], name: str) -> dict[int, float]:
    return metric_history(hostile_run["client"], hostile_run["run"].info.run_id, name)


def test_the_run_completes_with_the_honest_sites_model(hostile_run):
    assert hostile_run["run"].info.status == "FINISHED"
    # Only the two honest sites were aggregated, in both rounds.
    assert _history(hostile_run, "train/sites") == {1: 2.0, 2: 2.0}
    assert _history(hostile_run, "round/failed") == {1: 0.0, 2: 0.0}
    final = hostile_run["final"]
    assert all(torch.isfinite(v.float()).all() for v in final.values())
    assert "test/auc" in hostile_run["run"].data.metrics  # the report was written


def test_a_ghost_name_with_1e12_examples_is_the_authenticated_site_and_is_refused(hostile_run):
    reason = hostile_run["rejections"][1, "site-2"]
    assert reason.startswith("num-examples = 1e+12 is outside [1, ")
    assert not any("ghost" in key for key in hostile_run["run"].data.metrics)


def test_1e308_examples_are_refused_and_the_model_stays_finite(hostile_run):
    assert hostile_run["rejections"][2, "site-2"].startswith("num-examples = 1e+308 is outside")
    assert all(torch.isfinite(v.float()).all() for v in hostile_run["final"].values())


def test_inf_in_the_join_query_leaves_that_node_out_before_training(hostile_run):
    reasons = [r for (step, site), r in hostile_run["rejections"].items() if step == 0]
    assert any("train-images must be a whole number, got inf" in r for r in reasons)
    assert "site-3" not in str(sorted(hostile_run["run"].data.metrics))


def test_a_name_with_dots_leaves_that_node_out_and_reaches_no_mlflow_key(hostile_run):
    reasons = [r for (step, site), r in hostile_run["rejections"].items() if step == 0]
    assert any("site name '../site-4' is not" in r for r in reasons)
    assert not any(".." in key for key in hostile_run["run"].data.metrics)
