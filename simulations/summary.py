"""The end-of-run summary, read back from MLflow so that every number printed is traceable."""

from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

from common.config import ServerConfig
from common.errors import RadFLError
from common.privacy import BUDGET_STOP_TAG, ROUNDS_TRAINED_TAG
from common.report import build_report
from common.tasks import get_task
from server import tracking
from server.report_command import load_states, print_report
from server.rounds import POOLED, SITE, TRAIN


def round_table(run_id: str, metric_names: list[str]) -> pd.DataFrame:
    """One row per round, one column per metric, from the run's metric histories."""
    client = MlflowClient(tracking.tracking_uri())
    columns = {}
    for name in metric_names:
        history = client.get_metric_history(run_id, name)
        columns[name] = {m.step: m.value for m in history}
    table = pd.DataFrame(columns)
    table.index.name = "round"
    # Step 0 holds the untrained model's metrics (see baseline_table), not a round.
    return table[table.index > 0].sort_index()


def baseline_table(run_id: str, metric_names: list[str]) -> dict[str, float]:
    """The untrained model's metrics, logged at step 0."""
    client = MlflowClient(tracking.tracking_uri())
    values = {}
    for name in metric_names:
        at_zero = [m.value for m in client.get_metric_history(run_id, name) if m.step == 0]
        if at_zero:
            values[name] = at_zero[0]
    return values


def site_table(run_id: str, metric: str) -> pd.DataFrame:
    """Each site's ``metric`` at each round (columns: sites)."""
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(run_id)
    names = sorted(
        key for key in run.data.metrics if key.startswith(f"{SITE}/") and key.endswith(f"/{metric}")
    )
    table = round_table(run_id, names)
    table.columns = [name.split("/")[1] for name in names]
    return table


def print_summary(config: ServerConfig, *, wall_time_s: float) -> int:
    """Print the summary of the run tagged ``config.run_key``; 0 if it finished, else 1."""
    run = tracking.find_run(config.run_key, config.experiment_name)
    if run is None:
        print(
            f"No MLflow run was recorded (run key {config.run_key}); the simulation failed early."
        )
        return 1
    task = get_task(config.model_config)
    primary = task.primary_metric
    rounds = round_table(
        run.info.run_id,
        [
            f"{TRAIN}/loss",
            f"{POOLED}/{primary}",
            f"{POOLED}/loss",
            *(f"{POOLED}/{name}" for name in task.round_metrics),
        ],
    ).dropna(axis=1, how="all")
    sites = site_table(run.info.run_id, primary)
    status = run.info.status
    print()
    print(f"Pooled validation metrics per round (MLflow run {run.info.run_id}):")
    print(rounds.to_string(float_format=lambda v: f"{v:.4f}"))
    print()
    if sites.empty:
        print(
            f"Per-site validation {primary}: undefined at every site "
            "(each validation split lacks positives or negatives)"
        )
    else:
        print(f"Per-site validation {primary} per round:")
        print(sites.to_string(float_format=lambda v: f"{v:.4f}"))
    final = rounds[f"{POOLED}/{primary}"].dropna() if f"{POOLED}/{primary}" in rounds else None
    print()
    untrained = baseline_table(run.info.run_id, [f"{POOLED}/{primary}"]).get(f"{POOLED}/{primary}")
    if final is not None and len(final):
        print(
            f"Final pooled validation {primary}: {final.iloc[-1]:.4f} (best {final.max():.4f}"
            + (f"; untrained model {untrained:.4f})" if untrained is not None else ")")
        )
    has_report = status == "FINISHED"
    if has_report:
        try:
            report = build_report(load_states(run.info.run_id))
        except RadFLError as exc:
            print(f"No evaluation report: {exc}")
            has_report = False
        else:
            print()
            print_report(report)
            print(f"Report files (plots, model card): MLflow run {run.info.run_id}, report/")
    print(f"Wall time: {wall_time_s:.1f} s")
    print(
        f"MLflow: {tracking.tracking_uri()}  experiment '{config.experiment_name}'  "
        f"run {run.info.run_id}  status {status}"
    )
    print(f"Browse: mlflow ui --backend-store-uri {tracking.tracking_uri()}")
    planned = config.num_rounds
    if ROUNDS_TRAINED_TAG in run.data.tags:  # update-level DP's budget stopped training
        planned = int(run.data.tags[ROUNDS_TRAINED_TAG])
        print(f"Training stopped at the update-level DP budget: {run.data.tags[BUDGET_STOP_TAG]}")
    complete = status == "FINISHED" and len(rounds) == planned and has_report
    if not complete:
        print(
            f"The run did not complete: status {status}, "
            f"{len(rounds)} of {planned} rounds"
            f"{'' if has_report else ', no evaluation report'}."
        )
    return 0 if complete else 1
