"""The final evaluation: the selected model sent to every site once (``evaluate.final``), the
validation and test states of its replies (overall and per subgroup cell, the server's k
re-check) gathered into the report's split states.

What the ServerApp does outside Flower's rounds is split by role: ``server.roster`` (quorum,
registry, site descriptions, the send helper), this module, ``server.cross_site`` (local-only
models on every site) and ``server.publish`` (the report's stored states, files and metrics).
Their public names stay importable from here. A site that fails a message is named in the log
and in MLflow and left out; the others go on.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import WARNING

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import messages as keys
from common.errors import ConfigError
from common.report import SPLITS, SplitStates
from common.subgroups import parse_cell_name
from common.tasks import Task
from server import boundary
from server.cross_site import ModelStore, cross_site_validation, evaluate_everywhere
from server.publish import evaluation_states, metric_key, publish_report, report_metrics
from server.roster import (
    POLL_INTERVAL_S,
    LeftOutCallback,
    QuorumError,
    Site,
    describe_sites,
    exclude_from_training,
    load_registry,
    send,
    wait_for_sites,
)

__all__ = [
    "POLL_INTERVAL_S",
    "ConfigError",
    "LeftOutCallback",
    "ModelStore",
    "QuorumError",
    "Site",
    "add_checked_reply",
    "cross_site_validation",
    "describe_sites",
    "drop_small_cells",
    "evaluate_everywhere",
    "evaluation_states",
    "exclude_from_training",
    "final_evaluation",
    "load_registry",
    "log_refused",
    "metric_key",
    "publish_report",
    "report_metrics",
    "wait_for_sites",
]

#: The send helper under its old private name (tests call it).
_send = send


def final_evaluation(
    grid: Grid,
    sites: Mapping[int, Site],
    state: Mapping[str, torch.Tensor],
    num_classes: int,
    timeout: float,
    task: Task,
    *,
    min_cell_size: int,
    model_round: int | None = None,
) -> tuple[dict[str, SplitStates], dict[str, str]]:
    """Validation and test states of the final model from every site, and the sites that
    failed (name to reason); the split states are the run's ``task``'s, and every field of a
    reply is checked against it first (``server.boundary.check_final``). Cells holding fewer than
    ``min_cell_size`` patients are dropped on arrival whatever the site sent
    (:func:`drop_small_cells`). ``model_round`` is the round of ``state`` (FedBN sites use
    their own normalisation layers of that round)."""
    record = ArrayRecord(dict(state))  # one copy shared by every message, not one per site
    said = ConfigRecord({} if model_round is None else {keys.MODEL_ROUND: int(model_round)})
    content = {node: RecordDict({keys.ARRAYS: record, keys.CONFIG: said}) for node in sites}
    replies = send(grid, content, f"{MessageType.EVALUATE}.{keys.FINAL_EVALUATION}", timeout)
    splits = {split: SplitStates(num_classes, task) for split in SPLITS}
    failed: dict[str, str] = {}
    for node, reply in replies.items():
        name = sites[node].name
        if isinstance(reply, str):
            failed[name] = reply
            continue
        try:
            add_checked_reply(
                splits,
                name,
                boundary.check_final(reply.content, task, sites[node].counts),
                min_cell_size=min_cell_size,
            )
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            failed[name] = f"malformed final evaluation reply: {boundary.clean_text(exc)}"
    for name, reason in failed.items():
        log(WARNING, "[radfl] site %s left out of the final evaluation: %s", name, reason)
    return splits, failed


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
