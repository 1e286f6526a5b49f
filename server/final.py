"""What the ServerApp does outside Flower's training rounds.

Before the rounds: wait (with a deadline) for enough sites, ask each for its name and split
sizes (a ``query`` message). After the rounds: send the final model to every site once for the
test evaluation (``evaluate.final``), optionally run cross-site validation (``train.local``
then ``evaluate``), build the report from the returned states and log it to MLflow.

A site that fails a message is named in the log and in MLflow and left out; the others go on.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import mlflow
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy

from common import messages as keys
from common.config import ServerConfig
from common.errors import RadFLError
from common.report import SPLITS, EvaluationStates, Report, SplitStates, build_report
from common.report_files import write_report
from common.subgroups import parse_cell_name
from common.tasks import Task
from server import tracking

POLL_INTERVAL_S = 0.5


class QuorumError(RadFLError):
    """Too few sites connected before the deadline."""


@dataclass(frozen=True)
class Site:
    """A connected site as it described itself."""

    node_id: int
    name: str
    counts: dict[str, int]


def wait_for_sites(grid: Grid, minimum: int, deadline_s: float) -> list[int]:
    """Node ids once at least ``minimum`` sites are connected; raise after ``deadline_s``."""
    started = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() - started > deadline_s:
            raise QuorumError(
                f"{len(nodes)} site(s) connected after {deadline_s:.0f} s; the run needs "
                f"{minimum} (min-sites)"
            )
        time.sleep(POLL_INTERVAL_S)


def describe_sites(grid: Grid, node_ids: Iterable[int], timeout: float) -> dict[int, Site]:
    """Ask every node for its name and split sizes; nodes that fail are logged and left out."""
    replies = _send(grid, {node: RecordDict() for node in node_ids}, MessageType.QUERY, timeout)
    sites: dict[int, Site] = {}
    for node, reply in replies.items():
        if isinstance(reply, str):
            log(WARNING, "[radfl] node %d did not describe itself: %s", node, reply)
            continue
        metrics = keys.metric_record(reply.content)
        counts = {k: int(v) for k, v in metrics.items() if isinstance(v, int | float)}
        sites[node] = Site(node, _site_name(reply.content, node), counts)
    names = [s.name for s in sites.values()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RadFLError(f"several sites share the name(s) {', '.join(duplicates)}")
    return sites


def evaluate_everywhere(
    grid: Grid, sites: Mapping[int, Site], state: Mapping[str, torch.Tensor], timeout: float
) -> list[RecordDict]:
    """Every site's validation states of one model (the default ``evaluate`` message)."""
    record = ArrayRecord(dict(state))
    replies = _send(
        grid,
        {node: RecordDict({keys.ARRAYS: record}) for node in sites},
        MessageType.EVALUATE,
        timeout,
    )
    out = []
    for node, reply in replies.items():
        if isinstance(reply, str):
            log(WARNING, "[radfl] site %s did not evaluate: %s", sites[node].name, reply)
        else:
            out.append(reply.content)
    return out


def exclude_from_training(strategy: flwr_strategy.FedAvg, node_ids: set[int]) -> None:
    """Make ``strategy`` send no training message to ``node_ids`` (left-out sites): they are
    still evaluated every round, as external validation."""
    if not node_ids:
        return
    configure_train = strategy.configure_train

    def without_left_out(
        server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = configure_train(server_round, arrays, config, grid)
        return [m for m in messages if m.metadata.dst_node_id not in node_ids]

    strategy.configure_train = without_left_out  # type: ignore[method-assign]


def final_evaluation(
    grid: Grid,
    sites: Mapping[int, Site],
    state: Mapping[str, torch.Tensor],
    num_classes: int,
    timeout: float,
    task: str = "classification",
    *,
    min_cell_size: int,
) -> tuple[dict[str, SplitStates], dict[str, str]]:
    """Validation and test states of the final model from every site, and the sites that
    failed (name to reason). Cells holding fewer than ``min_cell_size`` patients are dropped
    on arrival whatever the site sent (see :func:`add_final_reply`)."""
    record = ArrayRecord(dict(state))  # one copy shared by every message, not one per site
    content = {node: RecordDict({keys.ARRAYS: record}) for node in sites}
    replies = _send(grid, content, f"{MessageType.EVALUATE}.{keys.FINAL_EVALUATION}", timeout)
    splits = {split: SplitStates(num_classes, task) for split in SPLITS}
    failed: dict[str, str] = {}
    for node, reply in replies.items():
        name = sites[node].name
        if isinstance(reply, str):
            failed[name] = reply
            continue
        try:
            add_final_reply(splits, name, reply.content, min_cell_size=min_cell_size)
        except (ValueError, KeyError, TypeError) as exc:
            failed[name] = f"malformed final evaluation reply: {exc}"
    for name, reason in failed.items():
        log(WARNING, "[radfl] site %s left out of the final evaluation: %s", name, reason)
    return splits, failed


def add_final_reply(
    splits: Mapping[str, SplitStates], site: str, content: RecordDict, *, min_cell_size: int
) -> None:
    """Add one site's ``evaluate.final`` reply to the split states.

    The server checks k again: a cell whose ``patients`` is below ``min_cell_size`` is
    dropped, logged, and counted as suppressed at that site, so that it reaches neither the
    report nor MLflow. Attributes the site's disclosure policy refused are logged.
    """
    suppressed = keys.config_record(content, keys.SUPPRESSED) or ConfigRecord()
    refused = keys.config_record(content, keys.REFUSED) or ConfigRecord()
    for attribute, reason in sorted(refused.items()):
        log(WARNING, "[radfl] site %s refused subgroup attribute %s: %s", site, attribute, reason)
    for split, states in splits.items():
        if split not in content:
            continue
        overall = keys.metric_record(content, split)
        cells: dict[str, MetricRecord] = {}
        patients: dict[str, int] = {}
        dropped: list[str] = []
        for key in content:
            prefix, sep, cell = key.partition("/")
            if prefix == split and sep:
                record = keys.metric_record(content, key)
                cells[cell] = record
                patients[cell] = int(keys.scalar(record, keys.PATIENTS))
        # Below k: that cell, and every cell of its attribute, so that the overall states
        # minus the kept cells do not give the small one back.
        small = sorted(cell for cell, count in patients.items() if count < min_cell_size)
        attributes = {parse_cell_name(cell)[0] for cell in small}
        dropped = sorted(cell for cell in cells if parse_cell_name(cell)[0] in attributes)
        for cell in small:
            log(
                WARNING,
                "[radfl] site %s sent %s/%s with %d patients, below min-cell-size %d: every "
                "%s cell of that split dropped",
                site,
                split,
                cell,
                patients[cell],
                min_cell_size,
                parse_cell_name(cell)[0],
            )
        for cell in dropped:
            del cells[cell], patients[cell]
        hidden = [str(c) for c in suppressed.get(split, [])]  # type: ignore[union-attr]
        states.add_site(site, overall, cells, patients, sorted(set(hidden) | set(dropped)))


def cross_site_validation(
    grid: Grid,
    sites: Mapping[int, Site],
    initial: Mapping[str, torch.Tensor],
    federated: Mapping[str, torch.Tensor],
    task: Task,
    num_rounds: int,
    timeout: float,
) -> dict[str, dict[str, float]]:
    """Validation AUC of each site's local-only model, and of the federated one, on every site.

    Each site trains from the same initial weights on its own data for as many epochs as the
    federated run gave it (``num_rounds`` x its ``local-epochs``); every model then visits
    every site. Returns ``matrix[model][site]``.
    """
    primary = task.primary_metric
    start = ArrayRecord(dict(initial))
    content = {
        node: RecordDict(
            {
                keys.ARRAYS: start,
                keys.CONFIG: ConfigRecord({keys.LOCAL_ROUNDS: num_rounds}),
            }
        )
        for node in sites
    }
    log(INFO, "[radfl] cross-site validation: training a local-only model at each site")
    trained = _send(grid, content, f"{MessageType.TRAIN}.{keys.LOCAL_TRAINING}", timeout)
    models: dict[str, Mapping[str, Any]] = {"federated": dict(federated)}
    for node, reply in trained.items():
        if isinstance(reply, str):
            log(WARNING, "[radfl] site %s trained no local model: %s", sites[node].name, reply)
            continue
        models[f"local:{sites[node].name}"] = keys.array_record(reply.content)
    matrix: dict[str, dict[str, float]] = {}
    for model_name, arrays in models.items():
        record = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord(dict(arrays))
        replies = _send(
            grid,
            {node: RecordDict({keys.ARRAYS: record}) for node in sites},
            MessageType.EVALUATE,
            timeout,
        )
        row: dict[str, float] = {}
        for node, reply in replies.items():
            if isinstance(reply, str):
                continue
            states = task.pool([keys.metric_record(reply.content)])
            row[sites[node].name] = states.compute()[primary]
        matrix[model_name] = row
        log(INFO, "[radfl] cross-site: %s evaluated on %d sites", model_name, len(row))
    return matrix


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
    return {k: float(v) for k, v in out.items() if v is not None}


def metric_key(text: str) -> str:
    """A name MLflow accepts as part of a metric key: ``<40`` becomes ``lt40``."""
    text = str(text).replace(">=", "ge").replace("<", "lt").replace(">", "gt")
    return re.sub(r"[^A-Za-z0-9_.\- ]", "-", text)


def _site_name(content: RecordDict, node: int) -> str:
    site = keys.config_record(content, keys.SITE)
    return str(site[keys.SITE_NAME]) if site and keys.SITE_NAME in site else f"node-{node}"


def _send(
    grid: Grid, content: Mapping[int, RecordDict], message_type: str, timeout: float
) -> dict[int, Message | str]:
    """Send one message per node and wait; a node's reply, or why there is none."""
    messages = [
        Message(content=record, dst_node_id=node, message_type=message_type)
        for node, record in content.items()
    ]
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(messages, timeout=timeout)}
    out: dict[int, Message | str] = {}
    for node in content:
        reply = replies.get(node)
        if reply is None:
            out[node] = f"no reply within {timeout:.0f} s"
        elif reply.has_error():
            out[node] = f"error {reply.error.code}: {reply.error.reason}"
        else:
            out[node] = reply
    return out
