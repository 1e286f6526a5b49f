"""End to end: ``radfl tune`` runs two tiny trials through real Flower simulations, records them
as children of one parent MLflow run and writes a configuration ``radfl simulate --config``
takes. One search for the whole module; each test reads a different part of it."""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from common.config import load_toml_config
from simulations import commands
from simulations.simulate import run_config_overrides
from simulations.tune import PARENT_RUN_TAG, STATE_TAG, TRIAL_TAG
from tests.simulations.conftest import TINY_SETTINGS, set_options, tracking_uri

pytestmark = pytest.mark.slow


@dataclass
class Search:
    folder: Path
    exit_code: int
    output: str
    client: MlflowClient
    parent: Any
    children: list[Any]


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Search]:
    folder = tmp_path_factory.mktemp("tune")
    # Learning rate and batch size are drawn; the rest is the tiny federation of the e2e tests.
    settings = {k: v for k, v in TINY_SETTINGS.items() if k != "batch-size"}
    parser = argparse.ArgumentParser()
    commands.tune.add_arguments(parser)
    args = parser.parse_args(
        [
            *("--trials", "2", "--sites", "2", "--rounds", "1", "--in-memory"),
            *("--model", "small-cnn", "--poll-s", "0.5", "--workdir", str(folder / ".radfl")),
            *set_options(settings),
        ]
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", tracking_uri(folder))
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exit_code = args.handler(args)
    client = MlflowClient(tracking_uri(folder))
    experiment = client.get_experiment_by_name("radfl")
    parents = client.search_runs([experiment.experiment_id], "tags.`radfl.mode` = 'tune'")
    assert len(parents) == 1, output.getvalue()
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{parents[0].info.run_id}'"
    )
    yield Search(folder, exit_code, output.getvalue(), client, parents[0], children)


def test_two_trials_are_child_runs_of_one_parent(search: Search):
    assert search.exit_code == 0, search.output[-3000:]
    assert sorted(run.data.tags[TRIAL_TAG] for run in search.children) == ["1", "2"]
    for run in search.children:
        assert run.data.tags["radfl.mode"] == "federated"
        assert run.data.tags[STATE_TAG] == "COMPLETE"
        assert run.info.status == "FINISHED"
        # The trial's drawn values reached the sites' training config.
        assert float(run.data.params["learning_rate"]) != 0.001
    assert search.parent.data.params["objective"] == "pooled/auc (validation)"
    assert "trial 2/2" in search.output and "round 1/1: pooled/auc" in search.output


def test_the_best_config_is_a_toml_that_simulate_config_takes(search: Search):
    best_run = search.parent.data.tags["radfl.tune.best-run"]
    best = next(run for run in search.children if run.info.run_id == best_run)
    path = search.folder / "tuned.toml"
    values = load_toml_config(path)
    parser = argparse.ArgumentParser()
    commands.simulate.add_arguments(parser)
    overrides = run_config_overrides(parser.parse_args(["--config", str(path), "--sites", "2"]))
    assert overrides["learning-rate"] == pytest.approx(float(best.data.params["learning_rate"]))
    assert overrides["batch-size"] == int(best.data.params["batch_size"])
    assert overrides["model"] == "small-cnn" and overrides["image-size"] == 32
    assert "run-key" not in values and "checkpoint-dir" not in values
    assert "run it with: radfl simulate --config tuned.toml --sites 2 --in-memory" in search.output


def test_the_trials_table_and_plot_are_on_the_parent_run(search: Search):
    run_id = search.parent.info.run_id
    table = pd.read_csv(search.client.download_artifacts(run_id, "tune/trials.csv"))
    assert table["state"].tolist() == ["COMPLETE", "COMPLETE"]
    assert set(table["mlflow_run_id"]) == {run.info.run_id for run in search.children}
    best = search.client.get_run(run_id).data.metrics["tune/best-objective"]
    assert best == table["objective"].max()
    names = {a.path for a in search.client.list_artifacts(run_id, "tune")}
    assert names == {"tune/objective.png", "tune/trials.csv", "tune/tuned.toml"}
