"""Snapshot ensembles: the global models of a run's best rounds, kept for ``radfl ensemble``.

A run keeps its best and final weights (``weights/best.pt``, ``weights/final.pt``) and a
checkpoint of its last round only. With ``snapshot-models = k`` the server also keeps, in
memory, the global models of the k rounds with the best pooled validation value of the task's
primary metric, and logs them at the end as ``weights/round-R.pt`` (each with its SHA-256 tag)
and the rounds in the tag ``radfl.snapshot-rounds``. A resumed run keeps only the snapshots of
the rounds after the resumption (the checkpoint does not hold them).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import mlflow
import torch
from flwr.app import ArrayRecord

from common.tasks import Task
from server import tracking
from server.rounds import POOLED

SNAPSHOT_ROUNDS_TAG = "radfl.snapshot-rounds"


def snapshot_artifact(server_round: int) -> str:
    """The artifact path of a round's snapshot."""
    return f"weights/round-{server_round}.pt"


class SnapshotKeeper:
    """The ``count`` best rounds' global models, by the task's primary metric."""

    def __init__(self, task: Task, count: int) -> None:
        self.count = count
        self.metric = f"{POOLED}/{task.primary_metric}"
        self.higher_is_better = task.metrics[task.primary_metric].higher_is_better
        self.kept: dict[int, tuple[float, dict[str, torch.Tensor]]] = {}

    def offer(self, server_round: int, arrays: ArrayRecord, metrics: dict[str, float]) -> None:
        """Keep this round's model if it is among the best ``count`` so far (a recorder's
        ``after_round`` hook); rounds without a finite value are never kept."""
        value = float(metrics.get(self.metric, math.nan))
        if not math.isfinite(value):
            return
        score = value if self.higher_is_better else -value
        if len(self.kept) >= self.count:
            worst = min(self.kept, key=lambda r: (self.kept[r][0], r))
            if score <= self.kept[worst][0]:
                return
            del self.kept[worst]
        self.kept[server_round] = (
            score,
            {k: v.clone() for k, v in arrays.to_torch_state_dict().items()},
        )

    def rounds(self) -> list[int]:
        """The kept rounds, best first."""
        return sorted(self.kept, key=lambda r: (-self.kept[r][0], r))

    def log(self) -> None:
        """Log the kept models to the active MLflow run."""
        with tempfile.TemporaryDirectory() as folder:
            for server_round in self.rounds():
                path = Path(folder) / Path(snapshot_artifact(server_round)).name
                tracking.log_weights(self.kept[server_round][1], path)
        mlflow.set_tag(SNAPSHOT_ROUNDS_TAG, ",".join(str(r) for r in self.rounds()))
