"""``radfl report RUN_ID``: regenerate a run's report from the metric states stored in MLflow.

The ServerApp logs ``report/states.json`` (summed metric states, never per-patient data) with
every federated run. This command downloads it, rebuilds every table, plot and the model card
into a folder, prints the headline tables, and with ``--log`` replaces the run's ``report/``
files with the regenerated ones.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from common.errors import RadFLError
from common.report import EvaluationStates, Report, build_report
from common.report_files import metrics_markdown, subgroup_markdown, write_report
from server import tracking

STATES_ARTIFACT = "report/states.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", help="MLflow run id of a federated run")
    parser.add_argument(
        "--out", type=Path, help="folder for the report files (default radfl-report-RUN_ID)"
    )
    parser.add_argument(
        "--log", action="store_true", help="also log the regenerated files to the run's report/"
    )


def load_states(run_id: str) -> EvaluationStates:
    """The evaluation states a run stored; a clear error when the run or the file is missing."""
    mlflow.set_tracking_uri(tracking.tracking_uri())
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=STATES_ARTIFACT, dst_path=folder
            )
        except (MlflowException, OSError) as exc:
            raise RadFLError(
                f"run {run_id} at {tracking.tracking_uri()} has no {STATES_ARTIFACT} "
                f"(not a finished federated run?): {str(exc).splitlines()[0]}"
            ) from None
        return EvaluationStates.from_json(json.loads(Path(path).read_text()))


def report(args: argparse.Namespace) -> int:
    states = load_states(args.run_id)
    result = build_report(states)
    out = (args.out or Path(f"radfl-report-{args.run_id}")).resolve()
    written = write_report(result, out)
    print_report(result)
    print(f"\nWrote {len(written)} files to {out}")
    if args.log:
        with mlflow.start_run(run_id=args.run_id):
            mlflow.log_artifacts(str(out), artifact_path="report")
        print(f"Logged them to run {args.run_id} under report/")
    return 0


def print_report(result: Report) -> None:
    """The headline tables: test metrics with intervals, per site, fairness, subgroups."""
    print(f"Test split, final model; operating threshold {result.threshold_note}")
    print(metrics_markdown(result.overall))
    primary = result.primary
    wanted = ("site", "role", "n", primary, f"{primary}_low", f"{primary}_high")
    columns = [c for c in wanted if c in result.sites]
    print("Per site (test):")
    print(result.sites[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print()
    if not result.fairness.empty:
        print("Fairness summary (test):")
        print(result.fairness.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print()
    print(subgroup_markdown(result))
