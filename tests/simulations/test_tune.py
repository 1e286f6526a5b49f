"""``radfl tune`` without Flower: its search space and ranges, the TOML it writes, and the
pruning glue (a trial's rounds read from MLflow, reported to Optuna, the simulation
interrupted, the trial and its child run recorded as pruned) with a stand-in simulation."""

from __future__ import annotations

import argparse
import io
import math
import time
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from common.config import load_toml_config, parse_overrides
from common.errors import ConfigError
from server import tracking
from simulations import commands
from simulations.tune import (
    INTERRUPTED,
    PARENT_RUN_TAG,
    STATE_TAG,
    TRIAL_TAG,
    Study,
)
from simulations.tune_space import DEFAULT_SPACE, parse_ranges, searched, write_toml


def _tune_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    commands.tune.add_arguments(parser)
    return parser.parse_args(list(argv))


def _simulate_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    commands.simulate.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("learning-rate=0.01:0.001", "LOW 0.01 must be below HIGH 0.001"),
        ("learning-rate=0:0.01", "learning-rate is searched on a log scale; LOW must be > 0"),
        ("proximal-mu=-1:1", "proximal-mu is searched on a log scale"),
        ("local-epochs=1.5:3", "local-epochs takes whole numbers of at least 1"),
        ("local-epochs=0:3", "local-epochs takes whole numbers of at least 1"),
        ("local-epochs=2:2", "--set local-epochs=VALUE"),
        ("batch-size=8,0", "every batch-size must be at least 1"),
        ("batch-size=8,big", "batch-size takes whole numbers"),
        ("weight-decay=0:1", "'weight-decay' is not searched; searched keys: learning-rate"),
        ("learning-rate", "expected KEY=LOW:HIGH"),
        ("learning-rate=0.001", "expected LOW:HIGH numbers"),
        ("learning-rate=a:b", "expected LOW:HIGH numbers"),
        ("learning-rate=1e-4:inf", "expected LOW:HIGH numbers"),
    ],
)
def test_a_bad_range_is_refused_naming_the_item(item: str, message: str):
    with pytest.raises(ConfigError, match=f"--range '{item}'") as raised:
        parse_ranges([item])
    assert message in str(raised.value)


def test_a_range_replaces_only_its_key():
    space = {p.key: p for p in parse_ranges(["learning-rate=1e-5:1e-3", "batch-size=4,8,8"])}
    assert (space["learning-rate"].low, space["learning-rate"].high) == (1e-5, 1e-3)
    assert space["learning-rate"].log
    assert space["batch-size"].choices == (4, 8)
    assert space["local-epochs"] == next(p for p in DEFAULT_SPACE if p.key == "local-epochs")


def test_a_key_the_strategy_does_not_read_or_the_config_fixes_is_not_searched():
    drawn, left = searched(DEFAULT_SPACE, strategy="fedavg", fixed={"batch-size"})
    assert [p.key for p in drawn] == ["learning-rate", "local-epochs"]
    assert left == {
        "batch-size": "fixed by --config/--set",
        "proximal-mu": "not used by fedavg; used by fedprox",
        "server-learning-rate": "not used by fedavg; used by fedadam and fedyogi",
    }
    drawn, _ = searched(DEFAULT_SPACE, strategy="fedprox", fixed=())
    assert "proximal-mu" in [p.key for p in drawn]
    drawn, _ = searched(DEFAULT_SPACE, strategy="fedyogi", fixed=())
    assert "server-learning-rate" in [p.key for p in drawn]


def test_nothing_left_to_search_is_refused_by_message(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _tune_args(
        *("--set", "learning-rate=0.001", "--set", "local-epochs=1", "--set", "batch-size=8")
    )
    with pytest.raises(ConfigError, match="nothing to search: learning-rate: fixed"):
        Study.prepare(args)


def test_a_trial_count_below_one_is_refused_by_message():
    args = _tune_args("--trials", "0")
    with pytest.raises(ConfigError, match="--trials 0: at least one trial"):
        args.handler(args)


def test_the_written_toml_round_trips_through_simulate_config(tmp_path: Path):
    values = {
        "learning-rate": 0.0007035737028722148,
        "local-epochs": 2,
        "batch-size": 16,
        "model": 'small-cnn "quoted"',
        "augment": False,
        "dp-delta": 1e-05,
    }
    path = tmp_path / "tuned.toml"
    write_toml(path, values, comments=["radfl tune: best of 2"])
    assert path.read_text().startswith("# radfl tune: best of 2\n[config]\n")
    assert load_toml_config(path) == values
    args = _simulate_args("--config", str(path), "--set", "model=small-cnn", "--sites", "2")
    from simulations.simulate import run_config_overrides

    overrides = run_config_overrides(args)
    assert {k: overrides[k] for k in ("learning-rate", "local-epochs", "batch-size")} == {
        "learning-rate": 0.0007035737028722148,
        "local-epochs": 2,
        "batch-size": 16,
    }


class PruneFirstTrial(optuna.pruners.BasePruner):
    """A stub pruner: the first trial is pruned at its first report, no other is."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number == 0


class FakeSimulation:
    """Stands in for ``simulate.simulate``: logs a federated run tagged with the trial's run
    key, as the ServerApp does, one round a poll interval; like ``radfl simulate``, returns
    130 when interrupted, and 1 (a run that did not complete) on call ``fail_call``."""

    def __init__(self, fail_call: int) -> None:
        self.codes: list[int] = []
        self.fail_call = fail_call

    def __call__(self, args: argparse.Namespace) -> int:
        run_key = parse_overrides(args.set)["run-key"]
        rate = parse_overrides(args.set)["learning-rate"]
        client = MlflowClient(tracking.tracking_uri())
        run = client.create_run(
            tracking.ensure_experiment("radfl"),
            tags={tracking.RUN_KEY_TAG: run_key, tracking.MODE_TAG: "federated"},
        )
        print("simulation output of", run_key)  # to the trial's log, not the console
        try:
            for step in range(1, args.rounds + 1):
                client.log_metric(run.info.run_id, "pooled/auc", 0.5 + rate * step, step=step)
                time.sleep(0.5 if step < args.rounds else 0)
        except KeyboardInterrupt:
            self.codes.append(INTERRUPTED)
            return INTERRUPTED
        code = 1 if len(self.codes) + 1 == self.fail_call else 0
        client.set_terminated(run.info.run_id, "FAILED" if code else "FINISHED")
        self.codes.append(code)
        return code


def test_a_pruned_trial_is_stopped_and_recorded_as_pruned_a_failed_one_as_failed(
    tmp_path: Path, monkeypatch
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    args = _tune_args(
        *("--trials", "3", "--rounds", "4", "--poll-s", "0.1", "--in-memory"),
        *("--workdir", str(tmp_path / "work"), "--range", "learning-rate=0.01:0.02"),
        *("--set", "local-epochs=1", "--set", "batch-size=8"),
    )
    fake = FakeSimulation(fail_call=2)
    study = Study.prepare(args, simulate=fake)
    study.console = io.StringIO()
    optuna_study = optuna.create_study(direction="maximize", pruner=PruneFirstTrial())
    assert study.optimize(optuna_study) == 0

    first, failed, second = optuna_study.trials
    assert first.state == optuna.trial.TrialState.PRUNED
    assert failed.state == optuna.trial.TrialState.FAIL  # and the study went on
    assert first.user_attrs["pruned_at_round"] < 4  # interrupted before its last round
    # Rounds logged while it was being stopped are not the trial's.
    assert max(first.intermediate_values) == first.user_attrs["pruned_at_round"]
    assert second.state == optuna.trial.TrialState.COMPLETE
    assert fake.codes == [INTERRUPTED, 1, 0]
    assert math.isclose(second.value, 0.5 + second.params["learning-rate"] * 4)

    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    experiment = client.get_experiment_by_name("radfl")
    parent = client.search_runs([experiment.experiment_id], "tags.`radfl.mode` = 'tune'")[0]
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'"
    )
    by_trial = {run.data.tags[TRIAL_TAG]: run for run in children}
    assert sorted(by_trial) == ["1", "2", "3"]
    assert by_trial["1"].data.tags[STATE_TAG] == "PRUNED"
    assert by_trial["1"].info.status == "KILLED"
    assert by_trial["2"].data.tags[STATE_TAG] == "FAIL"
    assert by_trial["3"].data.tags[STATE_TAG] == "COMPLETE"
    assert parent.info.status == "FINISHED"
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "tune/trials.csv"))
    assert table["state"].tolist() == ["PRUNED", "FAIL", "COMPLETE"]
    assert table["objective"].isna().tolist() == [True, True, False]
    assert table["mlflow_run_id"].tolist() == [by_trial[n].info.run_id for n in ("1", "2", "3")]
    log = Path(first.user_attrs["log"]).read_text()
    assert "simulation output of" in log
    console = study.console.getvalue()
    assert "trial 1: pruned after round" in console
    assert "simulation output of" not in console
    assert (
        load_toml_config(tmp_path / "tuned.toml")["learning-rate"] == second.params["learning-rate"]
    )
