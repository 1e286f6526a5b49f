"""The report of a run: its stored states (split states, run facts, settings), its files in
MLflow under ``report/`` and its key numbers as MLflow metrics.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow

from common.config import ServerConfig
from common.report import EvaluationStates, Report, SplitStates, build_report
from common.report_files import write_report
from common.report_trust import trust_metrics
from server import tracking


def evaluation_states(
    config: ServerConfig,
    splits: dict[str, SplitStates],
    *,
    run_id: str,
    mode: str,
    selected_round: int | None,
    site_summary: dict[str, dict[str, Any]],
    cross_site: dict[str, dict[str, float]] | None = None,
) -> EvaluationStates:
    """The stored input of a report: the split states plus the run facts and settings."""
    return EvaluationStates(
        splits=splits,
        external_sites=sorted(config.left_out_sites) if mode == "federated" else [],
        site_summary=site_summary,
        run={
            "run_id": run_id,
            "mode": mode,
            "task": config.task,
            "model": config.model,
            "spatial_dims": config.spatial_dims,
            "strategy": config.strategy if mode == "federated" else "pooled (centralized)",
            "num_rounds": config.num_rounds,
            "final_model": config.final_model,
            "selected_round": selected_round,
        },
        settings={
            "threshold_method": config.threshold_method,
            "target_sensitivity": config.target_sensitivity,
            "confidence_level": config.confidence_level,
            "min_cell_size": config.min_cell_size,
            "subgroups": config.subgroups,
        },
        cross_site=cross_site,
    )


def publish_report(
    states: EvaluationStates, extra_files: Mapping[str, str] | None = None
) -> Report:
    """Build the report, log its files under ``report/`` and its key numbers as metrics."""
    report = build_report(states)
    with tempfile.TemporaryDirectory() as folder:
        write_report(report, Path(folder))
        for name, text in (extra_files or {}).items():
            (Path(folder) / name).write_text(text)
        mlflow.log_artifacts(folder, artifact_path="report")
    tracking.log_metrics(report_metrics(report), step=int(states.run.get("num_rounds", 0)))
    return report


def report_metrics(report: Report) -> dict[str, float]:
    """The report's numbers as MLflow metrics: ``test/*``, ``test/site/*``,
    ``test/subgroup/*`` and ``test/fairness/*``."""
    out: dict[str, float] = {"test/threshold": report.threshold}
    for row in report.overall.itertuples(index=False):
        out[f"test/{row.metric}"] = row.value
        out[f"test/{row.metric}-low"] = row.low
        out[f"test/{row.metric}-high"] = row.high
    for row in report.sites.to_dict("records"):
        role = "external" if str(row["role"]).startswith("external") else "site"
        for metric in report.headline:
            if metric in row:
                out[f"test/{role}/{metric_key(row['site'])}/{metric}"] = row[metric]
    table = report.subgroups[report.subgroups["status"] != "suppressed"]
    for row in table.itertuples(index=False):
        base = f"test/subgroup/{metric_key(row.attribute)}/{metric_key(row.group)}/{row.metric}"
        out[base] = row.value
        if row.metric == report.primary:
            out[f"{base}-gap-to-rest"] = row.gap_to_rest
    for row in report.fairness.to_dict("records"):
        for column, value in row.items():
            if isinstance(value, int | float) and column != "groups":
                out[f"test/fairness/{metric_key(row['attribute'])}/{column}"] = value
    out.update(trust_metrics(report))
    return {k: float(v) for k, v in out.items() if v is not None}


def metric_key(text: str) -> str:
    """A name MLflow accepts as part of a metric key: ``<40`` becomes ``lt40``."""
    text = str(text).replace(">=", "ge").replace("<", "lt").replace(">", "gt")
    return re.sub(r"[^A-Za-z0-9_.\- ]", "-", text)
