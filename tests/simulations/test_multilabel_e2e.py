"""End to end: one real simulation of the multi-label task on site folders whose training
splits are 80 % unlabelled, with pseudo-labelling from round 2 (the two features share it, to
keep the suite short). It checks the report's per-finding rows with intervals, the subgroup
tables per finding, and that the sites pseudo-labelled and trained on unlabelled studies from
the start round on, and said how many."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from simulations.synth import FederationSpec, write_federation
from tests.simulations.conftest import (
    RADFL,
    metric_history,
    run_radfl,
    set_options,
    the_run,
    tracking_env,
)

pytestmark = pytest.mark.slow

SITES = ("site-0", "site-1")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multilabel-e2e")
    write_federation(
        folder / "data",
        FederationSpec(
            sites=2,
            task="multilabel",
            dims=2,
            seed=0,
            samples_per_site=40,
            image_size=32,
            num_classes=2,
            hidden_label_fraction=0.8,
        ),
    )
    settings = {
        "image-size": 32,
        "batch-size": 8,
        "local-epochs": 1,
        "min-cell-size": 2,
        # Just above a coin toss: after one round of a tiny model nearly every study passes.
        "pseudo-label-threshold": 0.501,
        "pseudo-label-start-round": 2,
    }
    command = [RADFL, "simulate", "--data", str(folder / "data"), "--sites", "2"]
    command += ["--rounds", "2", "--task", "multilabel", "--model", "small-cnn"]
    command += ["--node-config", "min-cell-size=2", *set_options(settings)]
    output = run_radfl(command, folder, tracking_env(folder))
    client, mlflow_run = the_run(folder)
    return {"output": output, "client": client, "run": mlflow_run, "folder": folder}


def _artifact(run: dict, name: str) -> pd.DataFrame:
    path = run["client"].download_artifacts(
        run["run"].info.run_id, f"report/{name}", str(run["folder"] / "dl")
    )
    return pd.read_csv(Path(path))


def test_the_report_has_per_finding_auc_with_intervals_macro_micro_and_subgroups(run):
    assert run["run"].info.status == "FINISHED"
    overall = _artifact(run, "metrics.csv").set_index("metric")
    for name in ("auc", "auc_micro", "auc/finding-1", "auc/finding-2"):
        assert overall.loc[name, "low"] <= overall.loc[name, "value"] <= overall.loc[name, "high"]
    assert overall.loc["auc/finding-1", "method"] == "DeLong"
    assert overall.loc["auc_micro", "method"] == "DeLong (pairs as cases)"
    subgroups = _artifact(run, "subgroups.csv")
    for finding in ("finding-1", "finding-2"):
        rows = subgroups[(subgroups["metric"] == f"auc/{finding}")]
        assert {"sex", "site"} <= set(rows["attribute"]), finding
    metrics = run["run"].data.metrics
    assert "test/auc/finding-2" in metrics and "test/auc_micro" in metrics


def test_sites_pseudo_label_from_the_start_round_and_report_the_count(run):
    client, run_id = run["client"], run["run"].info.run_id
    counts = {s: metric_history(client, run_id, f"site/{s}/pseudo-labels") for s in SITES}
    assert all(1 not in by_round for by_round in counts.values())  # round 1: not yet
    sent = [by_round[2] for by_round in counts.values() if 2 in by_round]
    assert sent and all(count >= 2 for count in sent)  # at least k (2) when sent
