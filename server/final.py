"""What the ServerApp does outside Flower's training rounds.

Before the rounds: wait (with a deadline) for enough sites, ask each for its name and split
sizes (a ``query`` message). After the rounds: send the final model to every site once for the
test evaluation (``evaluate.final``), optionally run cross-site validation (``train.local``
then ``evaluate``), build the report from the returned states and log it to MLflow.

A site that fails a message is named in the log and in MLflow and left out; the others go on.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import messages as keys
from common.config import ServerConfig
from common.errors import ConfigError, RadFLError
from common.report import SPLITS, EvaluationStates, Report, SplitStates, build_report
from common.report_files import write_report
from common.subgroups import parse_cell_name
from common.tasks import Task
from server import boundary, tracking
from server.strategy_mixins import leave_out
from server.validation import ArrivalGrid, check_weights

POLL_INTERVAL_S = 0.5


class QuorumError(RadFLError):
    """Too few sites connected before the deadline."""


@dataclass(frozen=True)
class Site:
    """A connected site: its authenticated node, its name, the split sizes it declared."""

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


#: Called with ``(who, reason)`` for a node or site left out of the run before training.
LeftOutCallback = Callable[[str, str], None]


def load_registry(path: str | Path) -> dict[int, str]:
    """Node id to site name, from the coordinator's ``registered.json``
    (``{name: {"node-id": ..., "key": ...}}``, written by ``radfl coordinator add-site``)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"site-registry file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"site-registry file {path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"site-registry file {path} must map site names to entries")
    registry: dict[int, str] = {}
    for name, entry in data.items():
        node = entry.get("node-id") if isinstance(entry, dict) else None
        try:
            boundary.check_site_name(name)
            node_id = boundary.count(node, "node-id", maximum=2**64 - 1)
        except boundary.BadReplyError as exc:
            raise ConfigError(f"site-registry file {path}: entry {name!r}: {exc}") from None
        if node_id in registry:
            raise ConfigError(
                f"site-registry file {path}: node {node_id} is registered as both "
                f"{registry[node_id]} and {name}"
            )
        registry[node_id] = name
    return registry


def describe_sites(
    grid: Grid,
    node_ids: Iterable[int],
    timeout: float,
    registry: Mapping[int, str] | None = None,
    on_left_out: LeftOutCallback | None = None,
) -> dict[int, Site]:
    """Ask every node for its split sizes; name it by ``registry`` (node id to the name
    registered for its key) or, without one (simulation), by the name it gives now, once:
    every later reply from that node is that site's, whatever it claims.

    A node that fails, sends a malformed description, is not registered, or gives a name
    another node gives too, is logged, reported to ``on_left_out`` and left out.
    """
    replies = _send(grid, {node: RecordDict() for node in node_ids}, MessageType.QUERY, timeout)
    described: dict[int, tuple[str, dict[str, int]]] = {}
    left_out: dict[str, str] = {}
    for node, reply in replies.items():
        label = f"node-{node}"
        if isinstance(reply, str):
            left_out[label] = f"did not describe itself: {reply}"
            continue
        try:
            description = boundary.check_description(reply.content)
        except boundary.BadReplyError as exc:
            left_out[label] = f"malformed description: {exc}"
            continue
        if registry is not None:
            if node not in registry:
                left_out[label] = "not registered (radfl coordinator add-site)"
                continue
            name = registry[node]
            if description.claimed_name not in (None, name):
                log(
                    WARNING,
                    "[radfl] node %d (registered as %s) calls itself %s: the name is ignored",
                    node,
                    name,
                    description.claimed_name,
                )
        elif description.claimed_name is None:
            left_out[label] = "gave no site name"
            continue
        else:
            name = description.claimed_name
        described[node] = (name, description.counts)
    names = [name for name, _ in described.values()]
    sites: dict[int, Site] = {}
    for node, (name, counts) in described.items():
        if names.count(name) > 1:
            left_out[f"node-{node}"] = f"another node also calls itself {name}"
        else:
            sites[node] = Site(node, name, counts)
    for who, reason in left_out.items():
        log(WARNING, "[radfl] %s left out of the run: %s", who, reason)
        if on_left_out is not None:
            on_left_out(who, reason)
    return sites


def evaluate_everywhere(
    grid: Grid,
    sites: Mapping[int, Site],
    state: Mapping[str, torch.Tensor],
    timeout: float,
    task: Task | None = None,
) -> list[RecordDict]:
    """Every site's validation states of one model (the default ``evaluate`` message), each
    checked (with ``task``) and stamped with the site's name."""
    record = ArrayRecord(dict(state))
    replies = _send(
        grid,
        {node: RecordDict({keys.ARRAYS: record}) for node in sites},
        MessageType.EVALUATE,
        timeout,
    )
    out = []
    for node, reply in replies.items():
        site = sites[node]
        if isinstance(reply, str):
            log(WARNING, "[radfl] site %s did not evaluate: %s", site.name, reply)
            continue
        try:
            metrics = (
                boundary.check_evaluate(
                    reply.content, task, site.counts.get(keys.VALIDATION_IMAGES, 0)
                )
                if task is not None
                else keys.metric_record(reply.content)
            )
        except (boundary.BadReplyError, ValueError) as exc:
            log(WARNING, "[radfl] evaluation of site %s rejected: %s", site.name, exc)
            continue
        content = RecordDict({keys.METRICS: metrics})
        boundary.stamp(content, site.name)
        out.append(content)
    return out


exclude_from_training = leave_out  # server.strategy_mixins.LeaveOutMixin


def final_evaluation(
    grid: Grid,
    sites: Mapping[int, Site],
    state: Mapping[str, torch.Tensor],
    num_classes: int,
    timeout: float,
    task: str = "classification",
    *,
    min_cell_size: int,
    checker: Task | None = None,
) -> tuple[dict[str, SplitStates], dict[str, str]]:
    """Validation and test states of the final model from every site, and the sites that
    failed (name to reason). With ``checker`` (the run's task), every field of a reply is
    checked first (``server.boundary.check_final``). Cells holding fewer than
    ``min_cell_size`` patients are dropped on arrival whatever the site sent
    (:func:`drop_small_cells`)."""
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
            if checker is not None:
                add_checked_reply(
                    splits,
                    name,
                    boundary.check_final(reply.content, checker, sites[node].counts),
                    min_cell_size=min_cell_size,
                )
            else:
                add_final_reply(splits, name, reply.content, min_cell_size=min_cell_size)
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            failed[name] = f"malformed final evaluation reply: {boundary.clean_text(exc)}"
    for name, reason in failed.items():
        log(WARNING, "[radfl] site %s left out of the final evaluation: %s", name, reason)
    return splits, failed


def add_final_reply(
    splits: Mapping[str, SplitStates], site: str, content: RecordDict, *, min_cell_size: int
) -> None:
    """Add one site's ``evaluate.final`` reply, read without the boundary checks, to the split
    states (cells below ``min_cell_size`` dropped: :func:`drop_small_cells`)."""
    suppressed = keys.config_record(content, keys.SUPPRESSED) or ConfigRecord()
    refused = keys.config_record(content, keys.REFUSED) or ConfigRecord()
    log_refused(site, {str(k): str(v) for k, v in refused.items()})
    for split, states in splits.items():
        if split not in content:
            continue
        cells: dict[str, MetricRecord] = {}
        patients: dict[str, int] = {}
        for key in content:
            prefix, sep, cell = key.partition("/")
            if prefix == split and sep:
                record = keys.metric_record(content, key)
                cells[cell] = record
                patients[cell] = int(keys.scalar(record, keys.PATIENTS))
        hidden = [str(c) for c in suppressed.get(split, [])]  # type: ignore[union-attr]
        dropped = drop_small_cells(site, split, cells, patients, min_cell_size)
        overall = keys.metric_record(content, split)
        states.add_site(site, overall, cells, patients, sorted(set(hidden) | set(dropped)))


def add_checked_reply(
    splits: Mapping[str, SplitStates],
    site: str,
    reply: boundary.FinalReply,
    *,
    min_cell_size: int,
) -> None:
    """Add one site's checked ``evaluate.final`` reply to the split states (cells below
    ``min_cell_size`` dropped: :func:`drop_small_cells`)."""
    log_refused(site, reply.refused)
    for split, overall in reply.overall.items():
        cells = dict(reply.cells.get(split, {}))
        patients = dict(reply.patients.get(split, {}))
        dropped = drop_small_cells(site, split, cells, patients, min_cell_size)
        hidden = set(reply.suppressed.get(split, [])) | set(dropped)
        splits[split].add_site(site, overall, cells, patients, sorted(hidden))


def drop_small_cells(
    site: str,
    split: str,
    cells: dict[str, MetricRecord],
    patients: dict[str, int],
    min_cell_size: int,
) -> list[str]:
    """The server checks k again, whatever the site sent: a cell of fewer than
    ``min_cell_size`` patients is dropped with every cell of its attribute (else the overall
    states minus the kept cells would give the small one back), logged, and counted as
    suppressed at that site, so it reaches neither the report nor MLflow. Removes them from
    ``cells`` and ``patients`` and returns their names."""
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
    return dropped


def log_refused(site: str, refused: Mapping[str, str]) -> None:
    """Log the subgroup attributes a site's disclosure policy refused, with its reasons."""
    for attribute, reason in sorted(refused.items()):
        log(WARNING, "[radfl] site %s refused subgroup attribute %s: %s", site, attribute, reason)


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

    Each local model is checked like a training update (the initial model's keys, shapes and
    dtypes, finite values) and written to disk the moment it arrives: the server holds one
    model at a time, not one per site. Evaluation replies are checked like the rounds' ones.
    """
    primary = task.primary_metric
    start = ArrayRecord(dict(initial))
    expected = {name: array.numpy() for name, array in start.items()}
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
    with tempfile.TemporaryDirectory(prefix="radfl-cross-site-") as folder:
        store = ModelStore(Path(folder), expected)
        trained = _send(
            ArrivalGrid(grid, store.take),
            content,
            f"{MessageType.TRAIN}.{keys.LOCAL_TRAINING}",
            timeout,
        )
        models: dict[str, Mapping[str, Any] | Path] = {"federated": dict(federated)}
        for node, reply in trained.items():
            name = sites[node].name
            reason = reply if isinstance(reply, str) else store.reasons.get(id(reply))
            path = None if isinstance(reply, str) else store.paths.get(id(reply))
            if reason is not None or path is None:
                log(WARNING, "[radfl] site %s trained no usable local model: %s", name, reason)
                continue
            models[f"local:{name}"] = path
        del trained
        matrix: dict[str, dict[str, float]] = {}
        for model_name, model in models.items():
            record = store.load(model) if isinstance(model, Path) else ArrayRecord(dict(model))
            replies = _send(
                grid,
                {node: RecordDict({keys.ARRAYS: record}) for node in sites},
                MessageType.EVALUATE,
                timeout,
            )
            del record
            row: dict[str, float] = {}
            for node, reply in replies.items():
                if isinstance(reply, str):
                    continue
                declared = sites[node].counts.get(keys.VALIDATION_IMAGES, 0)
                try:
                    metrics = boundary.check_evaluate(reply.content, task, declared)
                except boundary.BadReplyError as exc:
                    log(WARNING, "[radfl] cross-site: %s rejected: %s", sites[node].name, exc)
                    continue
                row[sites[node].name] = task.pool([metrics]).compute()[primary]
            matrix[model_name] = row
            log(INFO, "[radfl] cross-site: %s evaluated on %d sites", model_name, len(row))
    return matrix


class ModelStore:
    """Models written to disk as they arrive (one ``.npy`` per array) and read back
    memory-mapped: the server holds one model at a time however many sites send one."""

    def __init__(self, folder: Path, expected: Mapping[str, np.ndarray]) -> None:
        self.folder = folder
        self.expected = dict(expected)
        self.paths: dict[int, Path] = {}
        self.reasons: dict[int, str] = {}

    def take(self, reply: Message) -> None:
        """Check a reply's model, write it to disk and drop it from the reply."""
        if reply.has_error():
            return
        try:
            arrays = keys.array_record(reply.content)
        except ValueError as exc:
            self.reasons[id(reply)] = str(exc)
            return
        reason, _ = check_weights(arrays, self.expected)
        if reason is not None:
            self.reasons[id(reply)] = reason
        else:
            path = self.folder / f"model-{len(self.paths)}"
            path.mkdir()
            for index, name in enumerate(self.expected):
                np.save(path / f"{index}.npy", arrays[name].numpy())
            self.paths[id(reply)] = path
        del reply.content[keys.ARRAYS]

    def load(self, path: Path) -> ArrayRecord:
        return ArrayRecord(
            {
                name: Array(np.load(path / f"{index}.npy", mmap_mode="r"))
                for index, name in enumerate(self.expected)
            }
        )


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
            out[node] = f"error {reply.error.code}: {boundary.clean_text(reply.error.reason)}"
        else:
            out[node] = reply
    return out
