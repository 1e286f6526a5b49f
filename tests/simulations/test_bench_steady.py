"""`radfl bench --parts steady`: the validation curve's largest drop and the federated /
pooled test ratio, computed from what the runs logged to MLflow (issue 22, item 5)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from simulations.bench.parts import PARTS
from simulations.bench.runner import PROFILES, Runner
from simulations.bench.steady import MAX_DROP, MIN_RATIO, largest_drop

#: Issue 22's example of a swinging default (rounds 1..8) and the seed-0 default of
#: 2026-11-29 (rounds 0..20, simulations/results/privacy-utility-2026-11-29).
SWINGING = [0.77, 0.67, 0.44, 0.33, 0.69, 0.54, 0.78, 0.85]
RISING = [0.53, 0.52, 0.54, 0.52, 0.55, 0.53, 0.56, 0.59, 0.66, 0.73, 0.71, 0.82, 0.84, 0.84,
          0.86, 0.85, 0.85, 0.86, 0.85, 0.85, 0.85]  # fmt: skip


def test_largest_drop_counts_falls_after_the_round_below_the_best_of_every_earlier_round():
    swinging = list(enumerate(SWINGING, start=1))
    # Round 6 (0.54) falls 0.23 below round 1's 0.77, which came before round 5.
    assert largest_drop(swinging, after_round=5) == (pytest.approx(0.23), 6)
    # Counting from the start, round 4's 0.33 is the deepest: 0.44 below 0.77.
    assert largest_drop(swinging, after_round=0) == (pytest.approx(0.44), 4)
    drop, at = largest_drop(list(enumerate(RISING)), after_round=5)
    assert drop == pytest.approx(0.02) and at == 10  # 0.73 -> 0.71
    assert drop <= MAX_DROP
    # Order does not matter, a missing round is skipped, a curve that only rises has none.
    assert largest_drop(list(reversed(swinging)), after_round=5)[0] == pytest.approx(0.23)
    assert largest_drop([(1, 0.5), (2, math.nan), (3, 0.4)], after_round=0) == (
        pytest.approx(0.1),
        3,
    )
    assert largest_drop([(1, 0.5), (2, 0.6), (3, 0.7)], after_round=0) == (0.0, -1)


@pytest.fixture(scope="module")
def steady_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    """One tiny seed: the quick profile's 2 sites x 40 images at 32 px (fewer left a test
    split of one class: no test AUC), small-cnn, 2 rounds of 1 epoch, federated and pooled;
    drops counted from round 1 on."""
    out = tmp_path_factory.mktemp("steady")
    profile = replace(PROFILES["quick"], rounds=2, steady_after_round=0)
    table = PARTS["steady"](profile, Runner(out))
    return table, out


@pytest.mark.slow
def test_steady_part_reads_the_drop_and_the_ratio_from_the_runs_mlflow_metrics(
    steady_run: tuple[pd.DataFrame, Path],
):
    table, out = steady_run
    assert len(table) == 1
    row = table.iloc[0]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    federated = client.get_run(row["fed_run_id"])
    centralized = client.get_run(row["central_run_id"])
    assert federated.data.tags["radfl.mode"] == "federated"
    assert centralized.data.tags["radfl.mode"] == "centralized"

    # The drop, recomputed here: the running best (cumulative max) minus each round's value.
    history = sorted(client.get_metric_history(row["fed_run_id"], "pooled/auc"),
                     key=lambda m: m.step)  # fmt: skip
    assert [m.step for m in history] == [0, 1, 2]  # the untrained model, then each round
    values = np.array([m.value for m in history])
    falls = np.maximum.accumulate(values)[:-1] - values[1:]
    assert row["max_drop_after_round_0"] == pytest.approx(max(0.0, float(falls.max())))
    # The same rule on the mean of the sites' own validation AUCs, each round.
    sites = [
        [m.value for m in sorted(client.get_metric_history(row["fed_run_id"], f"site/site-{s}/auc"),
                                 key=lambda m: m.step)]
        for s in (0, 1)
    ]  # fmt: skip
    mean = np.mean(sites, axis=0)
    assert len(mean) == 3 and np.isfinite(mean).all()
    falls = np.maximum.accumulate(mean)[:-1] - mean[1:]
    assert row["per_hospital_max_drop_after_round_0"] == pytest.approx(max(0.0, float(falls.max())))

    fed_test = federated.data.metrics["test/auc"]
    central_test = centralized.data.metrics["test/auc"]
    assert row["fed_test"] == fed_test and row["central_test"] == central_test
    assert row["ratio"] == pytest.approx(fed_test / central_test)
    assert row["fed_test_low"] <= fed_test <= row["fed_test_high"]
    assert bool(row["passes"]) == (
        row["max_drop_after_round_0"] <= MAX_DROP and row["ratio"] >= MIN_RATIO
    )
    # Per-site test AUC where the site's test split has both classes (else MLflow has none).
    for site in (0, 1):
        logged = federated.data.metrics.get(f"test/site/site-{site}/auc", math.nan)
        assert row[f"fed_site{site}_test"] == pytest.approx(logged, nan_ok=True)

    # The curves, long: both trainings' rounds 0..2 with the runs they came from.
    curves = pd.read_csv(out / "steady_rounds.csv")
    assert sorted(curves["training"].unique()) == ["centralized", "federated"]
    for training, run_id in (("federated", federated.info.run_id),
                             ("centralized", centralized.info.run_id)):  # fmt: skip
        mine = curves[curves["training"] == training]
        assert list(mine["round"]) == [0, 1, 2] and set(mine["run_id"]) == {run_id}
    assert list(curves[curves["training"] == "federated"]["pooled_validation"]) == pytest.approx(
        list(values)
    )
    assert pd.read_csv(out / "steady.csv")["fed_run_id"].tolist() == [row["fed_run_id"]]
