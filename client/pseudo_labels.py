"""Pseudo-labels: a site also trains on the unlabelled studies the global model is sure about.

Rows of a site's manifest with a blank target are unlabelled studies. With
``pseudo-label-threshold > 0`` the site check lets them through and the site keeps those of its
training split apart (``SiteSplits.unlabelled``; unlabelled rows of the validation and test
splits are left out, as nothing can be measured on them). From round
``pseudo-label-start-round`` on, each round the site runs the global model it received over
them, keeps the studies whose prediction is confident (``Task.pseudo_label``: the top class's
probability, or every finding's probability or its complement, at least the threshold), and
trains on those with the predicted labels beside its labelled studies (pseudo-labelling, Lee,
"Pseudo-Label: The Simple and Efficient Semi-Supervised Learning Method for Deep Neural
Networks", ICML 2013 Workshop on Challenges in Representation Learning). The next round's
model labels them afresh.

What leaves the site: the number of pseudo-labelled studies (``pseudo-labels``) only when it
is at least the site's k (``min-cell-size``, the larger of the run's and the site's), like every
other count, else NaN (every site sends the key: Flower aggregates only replies whose metrics
have the same keys); ``num-examples`` stays the number of labelled studies, so the count cannot
be read from it either.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from client.datasets import ConcatLabelled, LabelledDataset
from common import messages as keys
from common.config import ClientConfig
from common.tasks import Task


class PseudoLabelled(Dataset[dict[str, Any]]):
    """The samples ``indices`` of an unlabelled dataset, each with its predicted target."""

    def __init__(self, base: LabelledDataset, indices: list[int], targets: torch.Tensor) -> None:
        if len(indices) != len(targets):
            raise ValueError(f"{len(indices)} samples but {len(targets)} pseudo-labels")
        self.base = base
        self.indices = indices
        self.labels = targets
        table = base.attributes
        self.attributes = None if table is None else table.iloc[indices].reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.base[self.indices[index]]["image"], "label": self.labels[index]}


@torch.no_grad()
def pseudo_label(
    task: Task,
    model: nn.Module,
    unlabelled: LabelledDataset,
    threshold: float,
    *,
    batch_size: int,
    device: torch.device,
) -> PseudoLabelled:
    """The studies of ``unlabelled`` that ``model`` labels with confidence ``threshold``."""
    model.to(device).eval()
    loader = DataLoader(
        cast(Dataset[dict[str, Any]], unlabelled), batch_size=batch_size, collate_fn=task.collate
    )
    chosen: list[int] = []
    targets: list[torch.Tensor] = []
    start = 0
    for batch in loader:
        images = batch["image"].to(device)
        prediction, _ = task.predict(model, {"image": images, "label": batch["label"]})
        target, confident = task.pseudo_label(prediction, threshold)
        confident = confident.cpu()
        chosen += (torch.nonzero(confident).flatten() + start).tolist()
        targets.append(target.cpu()[confident])
        start += len(images)
    labels = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    return PseudoLabelled(unlabelled, chosen, labels)


def training_set(
    task: Task,
    model: nn.Module,
    train: LabelledDataset,
    unlabelled: LabelledDataset | None,
    config: ClientConfig,
    server_round: int,
    device: torch.device,
) -> tuple[LabelledDataset, int | None]:
    """A round's training set: the labelled studies, and from the start round on the
    confidently pseudo-labelled ones; and how many of those (``None``: not pseudo-labelling
    this round)."""
    if (
        not config.pseudo_labelling
        or unlabelled is None
        or len(unlabelled) == 0
        or server_round < config.pseudo_label_start_round
    ):
        return train, None
    labelled = pseudo_label(
        task,
        model,
        unlabelled,
        config.pseudo_label_threshold,
        batch_size=config.batch_size * 2,
        device=device,
    )
    if len(labelled) == 0:
        return train, 0
    return ConcatLabelled([train, labelled]), len(labelled)


def disclosed_count(
    count: int | None, min_cell_size: int, pseudo_labelling: bool
) -> dict[str, float]:
    """The ``pseudo-labels`` metric a site sends: the count when it is at least k, else NaN
    (fewer than k, or none this round). Every site of a run with pseudo-labelling sends the
    key, as Flower aggregates only replies whose metrics have the same keys."""
    if not pseudo_labelling:
        return {}
    if count is None or count < min_cell_size:
        return {keys.PSEUDO_LABELS: math.nan}
    return {keys.PSEUDO_LABELS: float(count)}
