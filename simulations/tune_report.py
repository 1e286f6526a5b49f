"""The results of ``radfl tune``: the best configuration as TOML, a trials table (CSV) and a
plot of the objective per trial, written locally and logged to the search's parent run."""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any, Protocol

import optuna
import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from simulations.tune_space import Parameter, write_toml


class Study(Protocol):
    """What the results need of a search (``simulations.tune.Study``)."""

    args: argparse.Namespace
    base: dict[str, Any]
    space: tuple[Parameter, ...]
    metric: str
    higher_is_better: bool
    client: MlflowClient
    parent_run_id: str

    def say(self, text: str) -> None: ...


TRIALS_FILE = "trials.csv"
COMPLETE = optuna.trial.TrialState.COMPLETE
PLOT_FILE = "objective.png"


def trials_table(study: Study, trials: list[optuna.trial.FrozenTrial]) -> pd.DataFrame:
    """One row per trial: its state, objective, the round it was pruned after, its values and
    its MLflow run."""
    rows = []
    for trial in trials:
        rounds = trial.intermediate_values
        rows.append(
            {
                "trial": trial.number + 1,
                "state": trial.state.name,
                # Optuna gives a pruned trial its last round's value: not an objective.
                "objective": trial.value if trial.state == COMPLETE else math.nan,
                "last_round_value": rounds[max(rounds)] if rounds else math.nan,
                "pruned_at_round": trial.user_attrs.get("pruned_at_round", ""),
                **{key: trial.params.get(key, "") for key in (p.key for p in study.space)},
                "duration_s": trial.duration.total_seconds() if trial.duration else math.nan,
                "mlflow_run_id": trial.user_attrs.get("mlflow_run_id", ""),
            }
        )
    return pd.DataFrame(rows)


def objective_plot(table: pd.DataFrame, metric: str, higher_is_better: bool, path: Path) -> None:
    """The objective of each trial (pruned ones at their last round's value) and the best so
    far."""
    figure = Figure(figsize=(6, 3.5))
    axes = figure.subplots()
    complete = table[table["state"] == "COMPLETE"]
    pruned = table[table["state"] == "PRUNED"]
    axes.plot(complete["trial"], complete["objective"], "o", label="completed")
    axes.plot(pruned["trial"], pruned["last_round_value"], "x", color="grey", label="pruned")
    if len(complete):
        best = (
            complete["objective"].cummax() if higher_is_better else complete["objective"].cummin()
        )
        axes.step(complete["trial"], best, where="post", label="best so far")
    axes.set_xlabel("trial")
    axes.set_ylabel(f"{metric} (validation)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def publish(study: Study, optuna_study: optuna.Study) -> bool:
    """Write the best configuration, the table and the plot; log them to the parent run and
    print the best trial. Whether any trial completed."""
    trials = optuna_study.get_trials(deepcopy=False)
    table = trials_table(study, trials)
    client, parent = study.client, study.parent_run_id
    for row in table.itertuples(index=False):
        if row.state == "COMPLETE":
            client.log_metric(parent, "tune/objective", float(row.objective), step=int(row.trial))
    complete = [t for t in trials if t.state == COMPLETE]
    counts = table["state"].value_counts().to_dict() if len(table) else {}
    study.say("trials: " + ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items())))
    with tempfile.TemporaryDirectory() as folder:
        table_path = Path(folder) / TRIALS_FILE
        table.to_csv(table_path, index=False)
        plot_path = Path(folder) / PLOT_FILE
        objective_plot(table, study.metric, study.higher_is_better, plot_path)
        client.log_artifact(parent, str(table_path), artifact_path="tune")
        client.log_artifact(parent, str(plot_path), artifact_path="tune")
    if not complete:
        study.say("no trial completed: no configuration written")
        return False
    best = optuna_study.best_trial
    values = best_config(study, best.params)
    output = study.args.output.resolve()
    write_toml(
        output,
        values,
        comments=[
            f"radfl tune: trial {best.number + 1} of {len(trials)}, {study.metric} "
            f"{best.value:.4f} on validation (parent MLflow run {parent})",
            f"radfl simulate --config {study.args.output} {simulate_options(study)}".rstrip(),
        ],
    )
    client.log_artifact(parent, str(output), artifact_path="tune")
    client.log_metric(parent, "tune/best-objective", float(best.value or math.nan))
    client.set_tag(parent, "radfl.tune.best-trial", str(best.number + 1))
    client.set_tag(parent, "radfl.tune.best-run", best.user_attrs.get("mlflow_run_id", ""))
    study.say(
        f"best: trial {best.number + 1}, {study.metric} {best.value:.4f} on validation with "
        + ", ".join(f"{k}={v}" for k, v in best.params.items())
    )
    command = f"radfl simulate --config {study.args.output} {simulate_options(study)}"
    study.say(f"written to {output}; run it with: {command}")
    return True


def best_config(study: Study, params: dict[str, Any]) -> dict[str, Any]:
    """The run config of the best trial: the search's base overrides and its values (the keys
    each run sets for itself left out)."""
    return {**study.base, **params}


def simulate_options(study: Study) -> str:
    """The ``radfl simulate`` options outside the run config that the trials had."""
    args = study.args
    parts = [f"--sites {args.sites}"]
    if args.in_memory:
        parts.append("--in-memory")
    if args.data is not None:
        parts.append(f"--data {args.data}")
    return " ".join(parts)
