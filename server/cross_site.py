"""Cross-site validation: each site's local-only model, and the federated one, evaluated on
every site; and one model's validation states from every site.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import messages as keys
from common.tasks import Task
from server import boundary
from server.roster import Site, send
from server.validation import ArrivalGrid, check_weights


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
    replies = send(
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


def cross_site_validation(
    grid: Grid,
    sites: Mapping[int, Site],
    initial: Mapping[str, torch.Tensor],
    federated: Mapping[str, torch.Tensor],
    task: Task,
    num_rounds: int,
    timeout: float,
) -> dict[str, dict[str, float]]:
    """The task's primary validation metric of each site's local-only model, and of the
    federated one, on every site.

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
        trained = send(
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
            replies = send(
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
