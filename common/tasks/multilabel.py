"""Multi-label image classification: several binary findings per image.

One sigmoid output per finding, trained with binary cross-entropy; the classification
networks serve it with one output per finding (``num-classes`` is the number of findings).
A site's manifest gives each image's findings in its ``labels`` column as one 0/1 flag per
finding, ``;``-separated (``0;1``: finding 2 only); a blank ``labels`` is an unlabelled study,
usable only with pseudo-labelling. Metric states, per-finding AUC with DeLong intervals and the
macro and micro summaries are in ``common.multilabel_metrics``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from common import manifest as mf
from common.errors import ConfigError
from common.multilabel_metrics import MULTILABEL_METRICS, MultilabelStates
from common.tasks.base import Batch, MetricStates, Task, register_task
from common.tasks.classification import ClassificationTask

if TYPE_CHECKING:
    from common.synthetic import SiteData

#: The flags of one ``labels`` cell are separated by this.
SEPARATOR = ";"


@register_task
class MultilabelTask(Task):
    """Several binary findings per image: sigmoid outputs, BCE, per-finding states."""

    name = "multilabel"
    primary_metric = "auc"
    headline_metrics = ("auc", "auc_micro", "sensitivity", "specificity")
    metrics = MULTILABEL_METRICS
    required_columns = (mf.LABELS,)
    label_is_target = True
    label_column = mf.LABELS
    default_batch_size = 32
    default_model = "resnet18"
    model_family = "classification"
    threshold_note = "0.5 on every finding"
    round_metrics: ClassVar[tuple[str, ...]] = ("auc_micro", "sensitivity", "specificity")

    def output_channels(self) -> int:
        return self.config.num_classes

    def loss_function(self, train_labels: torch.Tensor | None, balance: bool) -> nn.Module:
        """BCE on the logits; ``balance`` weighs each finding's positives by its
        negatives-to-positives ratio (``pos_weight``; 1 for a finding without positives)."""
        if not balance or train_labels is None or train_labels.ndim != 2:
            return nn.BCEWithLogitsLoss()
        positives = train_labels.float().sum(dim=0)
        negatives = len(train_labels) - positives
        ratio = torch.where(positives > 0, negatives / positives.clamp(min=1), 1.0)
        return nn.BCEWithLogitsLoss(pos_weight=ratio)

    def sample_weights(self, labels: torch.Tensor) -> torch.Tensor:
        """The rarest finding an image holds sets its weight: each finding's positives and
        negatives weigh ``n / (2 * count)``, an image takes the largest of its flags'."""
        flags = labels.long()
        positives = flags.sum(dim=0).float()
        counts = torch.stack([len(flags) - positives, positives])  # (2, K)
        weights = torch.where(counts > 0, len(flags) / (2 * counts.clamp(min=1)), 0.0)
        per_flag = torch.gather(weights, 0, flags)  # (N, K): the weight of each flag's value
        return per_flag.max(dim=1).values

    def train_step(self, model: nn.Module, batch: Batch, loss_function: nn.Module) -> torch.Tensor:
        logits = model(batch["image"])
        return loss_function(logits.float(), batch["label"].float())  # type: ignore[no-any-return]

    @classmethod
    def operating_threshold(
        cls, validation: MetricStates, method: str, target_sensitivity: float
    ) -> tuple[float, str]:
        """0.5 on every finding: one threshold chosen for all findings would suit none."""
        return 0.5, cls.threshold_note

    @classmethod
    def empty_states(cls, num_classes: int) -> MultilabelStates:
        return MultilabelStates(num_classes)

    def predict(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(model(batch["image"]).float()), batch["label"]

    def pseudo_label(
        self, prediction: torch.Tensor, threshold: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every finding's flag at 0.5; an image is confident when each finding's probability
        is at least ``threshold`` or at most ``1 - threshold``."""
        confident = ((prediction >= threshold) | (prediction <= 1.0 - threshold)).all(dim=1)
        return (prediction >= 0.5).long(), confident

    @classmethod
    def parse_label(cls, text: str, num_classes: int | None) -> list[int]:
        """``0;1``: one 0/1 flag per finding, ``num_classes`` of them."""
        flags = [part.strip() for part in text.split(SEPARATOR)]
        bad = [flag for flag in flags if flag not in ("0", "1")]
        if bad:
            raise ValueError(
                f"column {mf.LABELS} {text!r}: {bad[0]!r} is not a 0/1 flag (one per finding, "
                f"separated by {SEPARATOR!r})"
            )
        if num_classes is not None and len(flags) != num_classes:
            raise ValueError(
                f"column {mf.LABELS} {text!r} holds {len(flags)} flag(s); the run has "
                f"{num_classes} finding(s) (num-classes)"
            )
        return [int(flag) for flag in flags]

    @classmethod
    def synthetic_options(cls) -> dict[str, Any]:
        return {"second_finding": True}

    def synthetic_targets(self, data: SiteData) -> torch.Tensor:
        if data.findings is None or data.findings.shape[1] != self.config.num_classes:
            raise ConfigError(
                "a synthetic multi-label site has 2 findings (a round and an elongated lesion): "
                f"num-classes must be 2, got {self.config.num_classes}"
            )
        return data.findings

    def augmentation(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return ClassificationTask.augmentation(self)  # type: ignore[arg-type]
