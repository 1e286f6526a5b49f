"""``radfl ensemble``: several global models as one, evaluated on the synthetic hospitals.

The members are the models of several runs (other strategies or seeds: each run's delivered
model, ``weights/best.pt`` or ``final.pt``) or, with ``--snapshots K``, each run's K best
rounds (a snapshot ensemble: the run kept them with ``snapshot-models``; server/snapshots.py).
Every weights file is checked against the SHA-256 its run recorded and loaded weights-only.

The ensemble predicts the mean of its members' probabilities (``common.ensemble``). Each member
and the ensemble are evaluated as a run's final evaluation is: summed states over the sites'
validation splits pick the operating threshold, summed states over their test splits give the
headline metrics with intervals. The member with the best validation value of the task's
primary metric is the one the ensemble is reported against (chosen without the test splits).
``--out`` writes an ensemble folder that ``radfl predict`` takes.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from client.site import SiteSplits, site_folder, synthetic_site
from client.trainer import LocalTrainer
from common import ensemble
from common.config import ClientConfig, ServerConfig, default_run_config, from_run_config
from common.errors import ConfigError
from common.report_files import fmt_ci
from common.tasks import MetricStates, Task, get_task
from common.transfer import load_weights_file, verify_sha256
from server import tracking
from server.snapshots import SNAPSHOT_ROUNDS_TAG, snapshot_artifact
from server.transfer import run_weights
from simulations.simulate import federation_data, run_config_overrides

#: Run params that must equal the evaluation's run config for a member to be evaluated by it.
MATCHED_PARAMS = ("task", "model", "spatial_dims", "image_size", "num_classes")
ENSEMBLE = "ensemble"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from simulations import simulate as options

    parser.add_argument("runs", nargs="+", metavar="RUN", help="MLflow run ids of RadFL runs")
    parser.add_argument(
        "--snapshots",
        type=int,
        default=0,
        metavar="K",
        help="each run's K best rounds as members (the run kept them with snapshot-models; "
        "default 0: each run's delivered model)",
    )
    parser.add_argument(
        "--out", type=Path, help="write the ensemble folder here (for radfl predict)"
    )
    options.add_arguments(parser)
    parser.set_defaults(handler=run)


@dataclass(frozen=True)
class Evaluated:
    """A model's pooled states on the sites' validation and test splits."""

    name: str
    validation: MetricStates
    test: MetricStates


def members(runs: list[str], snapshots: int, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Name to state dict of every member, each file checked against its recorded SHA-256."""
    if snapshots < 0:
        raise ConfigError(f"--snapshots must be >= 0, got {snapshots}")
    if len(runs) == 1 and snapshots == 0:
        raise ConfigError(
            "one run's delivered model is no ensemble: give several runs, or --snapshots K for "
            "its K best rounds (the run needs snapshot-models >= K)"
        )
    client = MlflowClient(tracking.tracking_uri())
    found: dict[str, dict[str, torch.Tensor]] = {}
    for run_id in runs:
        artifacts: dict[str, str | None] = {run_id[:8]: None}
        if snapshots:
            kept = client.get_run(run_id).data.tags.get(SNAPSHOT_ROUNDS_TAG, "")
            rounds = [int(r) for r in kept.split(",") if r]
            if not rounds:
                raise ConfigError(
                    f"run {run_id} kept no snapshots: run it with snapshot-models = {snapshots}"
                )
            artifacts = {
                f"{run_id[:8]}:round-{r}": snapshot_artifact(r) for r in rounds[:snapshots]
            }
        for name, artifact in artifacts.items():
            path, recorded = run_weights(run_id, folder, artifact, what=f"run {run_id}")
            if not recorded:
                raise ConfigError(f"run {run_id}: no SHA-256 was recorded for {path.name}")
            verify_sha256(path, recorded, what=f"run {run_id} {path.name}")
            found[name] = load_weights_file(path, what=f"run {run_id}")
    return found


def check_runs(runs: list[str], config: ServerConfig) -> None:
    """Refuse, by key, a run whose network the run config would not rebuild."""
    client = MlflowClient(tracking.tracking_uri())
    for run_id in runs:
        params = client.get_run(run_id).data.params
        for key in MATCHED_PARAMS:
            ours = str(getattr(config, key))
            if key in params and params[key] != ours:
                raise ConfigError(
                    f"run {run_id} has {key.replace('_', '-')} = {params[key]}, the evaluation "
                    f"{ours}: give --set {key.replace('_', '-')}={params[key]}"
                )


def evaluate(
    task: Task, trainer: LocalTrainer, sites: list[SiteSplits], models: Mapping[str, nn.Module]
) -> list[Evaluated]:
    """Each model's states summed over the sites' validation and test splits."""
    results = []
    for name, model in models.items():
        validation, test = task.new_states(), task.new_states()
        for site in sites:
            validation.merge(trainer.evaluate(model, site.validation))
            if site.test is not None and len(site.test):
                test.merge(trainer.evaluate(model, site.test))
        results.append(Evaluated(name, validation, test))
    return results


def report(task: Task, config: ServerConfig, results: list[Evaluated]) -> pd.DataFrame:
    """One row per model: threshold chosen on validation, headline test metrics with
    intervals, the primary metric on validation."""
    rows = []
    for result in results:
        threshold, _ = task.operating_threshold(
            result.validation, config.threshold_method, config.target_sensitivity
        )
        summary = result.test.summary(config.confidence_level, threshold)
        row: dict[str, object] = {
            "model": result.name,
            f"validation {task.primary_metric}": result.validation.compute()[task.primary_metric],
            "threshold": threshold,
        }
        for metric in task.headline_metrics:
            if metric in summary:
                m = summary[metric]
                row.update({metric: m.value, f"{metric} low": m.low, f"{metric} high": m.high})
        rows.append(row)
    return pd.DataFrame(rows)


def best_member(task: Task, table: pd.DataFrame) -> str:
    """The member with the best validation primary metric."""
    column = f"validation {task.primary_metric}"
    candidates = table[table["model"] != ENSEMBLE]
    higher = task.metrics[task.primary_metric].higher_is_better
    ordered = candidates.sort_values(column, ascending=not higher, na_position="last")
    return str(ordered["model"].iloc[0])


def run(args: argparse.Namespace) -> int:
    overrides = run_config_overrides(args)
    run_config = {**default_run_config(), **overrides}
    server_config = from_run_config(ServerConfig, run_config)
    client_config = from_run_config(ClientConfig, run_config)
    task = get_task(client_config.model_config)
    check_runs(list(args.runs), server_config)
    with tempfile.TemporaryDirectory() as folder:
        states = members(list(args.runs), int(args.snapshots), Path(folder))
    networks: dict[str, nn.Module] = {}
    for name, state in states.items():
        network = task.build_model()
        network.load_state_dict(state)
        networks[name] = network.eval()
    networks[ENSEMBLE] = ensemble.MeanProbabilities(list(networks.values())).eval()
    data_root = federation_data(args, overrides)
    sites = [
        synthetic_site(i, args.sites, client_config)
        if data_root is None
        else site_folder({"data-path": str(data_root / f"site-{i}")}, client_config)
        for i in range(args.sites)
    ]
    trainer = LocalTrainer(task, client_config, sites[0].train, sites[0].validation)
    table = report(task, server_config, evaluate(task, trainer, sites, networks))
    print(_text(task, table))
    best = best_member(task, table)
    primary = task.primary_metric
    rows = table.set_index("model")
    if primary in rows.columns:
        print(
            f"ensemble of {len(states)}: test {primary} "
            f"{_ci(rows.loc[ENSEMBLE], primary)}; best member ({best}, by validation): "
            f"{_ci(rows.loc[best], primary)}"
        )
    if args.out is not None:
        metadata = {**tracking.model_metadata(server_config, None)}
        threshold = float(rows.loc[ENSEMBLE, "threshold"])
        metadata["threshold"] = threshold if math.isfinite(threshold) else None
        ensemble.write_folder(args.out, metadata, states)
        table.to_csv(args.out / "ensemble_report.csv", index=False)
        print(f"ensemble folder: {args.out} (radfl predict {args.out} IMAGES... --out DIR)")
    return 0


def _ci(row: pd.Series, metric: str) -> str:
    return fmt_ci(row[metric], row.get(f"{metric} low"), row.get(f"{metric} high"))


def _text(task: Task, table: pd.DataFrame) -> str:
    lines = []
    for _, row in table.iterrows():
        parts = [f"{row['model']:<20}"]
        parts += [f"{m} {_ci(row, m)}" for m in task.headline_metrics if m in row.index]
        lines.append("  ".join(parts))
    return "\n".join(lines)
