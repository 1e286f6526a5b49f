"""The snapshot keeper keeps the global models of the k best rounds by the primary metric."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from common.tasks import get_task
from common.tasks.base import ModelConfig
from server.snapshots import SnapshotKeeper


def test_it_keeps_the_k_best_rounds_and_their_own_weights():
    task = get_task(ModelConfig("classification", "small-cnn", 2, 32, 2, 0))
    keeper = SnapshotKeeper(task, count=2)
    aucs = {1: 0.60, 2: 0.75, 3: float("nan"), 4: 0.70, 5: 0.65}
    for server_round, auc in aucs.items():
        arrays = ArrayRecord({"w": torch.full((2,), float(server_round))})
        keeper.offer(server_round, arrays, {f"pooled/{task.primary_metric}": auc})
    assert keeper.rounds() == [2, 4]  # best first; round 3 (NaN) never kept
    assert torch.equal(keeper.kept[4][1]["w"], torch.full((2,), 4.0))
