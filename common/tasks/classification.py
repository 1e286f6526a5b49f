"""Binary or multi-class image classification (class 0: no finding)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from monai import transforms as mt
from torch import nn

from common import attention as att
from common import evaluation as ev
from common import manifest as mf
from common import selective as sel
from common import uncertainty as unc
from common.metrics import CLASSIFICATION_METRICS, ClassificationStates
from common.tasks.base import (
    Batch,
    MetricStates,
    Overlay,
    Task,
    inverse_frequency_weights,
    register_task,
)


@register_task
class ClassificationTask(Task):
    """Binary or multi-class image classification (class 0: no finding)."""

    name = "classification"
    primary_metric = "auc"
    headline_metrics = ("auc", "sensitivity", "specificity", "ece")
    metrics = CLASSIFICATION_METRICS
    required_columns = (mf.LABEL,)
    label_is_target = True
    #: Classification learns as well at 32 as at 8 here and runs faster.
    default_batch_size = 32
    default_model = "resnet18"
    lesion_masks = True
    round_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "sensitivity", "specificity")

    def output_channels(self) -> int:
        return self.config.num_classes

    def loss_function(self, train_labels: torch.Tensor | None, balance: bool) -> nn.Module:
        if not balance or train_labels is None:
            return nn.CrossEntropyLoss()
        return nn.CrossEntropyLoss(weight=self._class_weights(train_labels))

    def sample_weights(self, labels: torch.Tensor) -> torch.Tensor:
        return self._class_weights(labels)[labels]

    def _class_weights(self, labels: torch.Tensor) -> torch.Tensor:
        return inverse_frequency_weights(labels, self.config.num_classes)

    @classmethod
    def empty_states(cls, num_classes: int) -> ClassificationStates:
        return ClassificationStates(num_classes)

    @classmethod
    def operating_threshold(
        cls, validation: MetricStates, method: str, target_sensitivity: float
    ) -> tuple[float, str]:
        """Binary: the threshold on the positive class by ``method``; without the validation
        positives or negatives the method needs, 0.5 and a note saying so. Multi-class tasks
        predict the arg-max class and have no threshold (NaN)."""
        if not isinstance(validation, ClassificationStates):
            raise TypeError(f"classification takes ClassificationStates, got {validation!r}")
        if validation.num_classes != 2:
            return math.nan, "multi-class: the predicted class is the arg-max, no threshold"
        neg, pos = validation.positive_histograms()
        try:
            threshold = ev.choose_threshold(
                neg,
                pos,
                method=method,  # type: ignore[arg-type]
                target_sensitivity=target_sensitivity,
            )
        except ValueError as exc:
            return 0.5, f"0.5 (fallback: {exc})"
        if method == "target-sensitivity":
            how = f"highest threshold with validation sensitivity >= {target_sensitivity:g}"
        else:
            how = "Youden's J on the pooled validation split"
        return threshold, f"{threshold:.4f} ({how}; applied unchanged to test)"

    def predict(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch["image"]).float()
        return torch.softmax(logits, dim=1), batch["label"]

    def pseudo_label(
        self, prediction: torch.Tensor, threshold: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The arg-max class, confident where its probability is at least ``threshold``."""
        confidence, predicted = prediction.max(dim=1)
        return predicted, confidence >= threshold

    #: How the final evaluation measures each case's uncertainty (``common.uncertainty``).
    uncertainty: unc.Method = "mc-dropout"

    def final_predict(self, model: nn.Module, batch: Batch) -> tuple[Any, torch.Tensor]:
        """Probabilities with the trust inputs of ``ClassificationStates.update``: the
        deterministic logits (calibration), the normalised predictive entropy of
        ``uncertainty`` (selective prediction) and, where the batch carries a ``lesion``
        mask, the share of Grad-CAM mass inside it (attention)."""
        logits, sampled = unc.predictive_probabilities(
            model, batch["image"], self.uncertainty, seed=self.config.seed
        )
        final: dict[str, torch.Tensor] = {
            "probs": torch.softmax(logits, dim=1),
            "logits": logits,
            "entropy": sel.normalised_entropy(sampled),
        }
        if "lesion" in batch:
            maps = att.grad_cam(model, batch["image"])
            final["attention"] = att.share_inside(maps, batch["lesion"])
        return final, batch["label"]

    #: The Grad-CAM region an overlay outlines: where the map reaches this share of its peak.
    OVERLAY_CAM_LEVEL = 0.5

    def overlay(self, model: nn.Module, sample: dict[str, Any]) -> Overlay | None:
        """In simulation only (``simulations.overlays``): the lesion mask as truth and the
        Grad-CAM hot region (the map at half its peak and above) as the prediction; ``None``
        without a lesion mask."""
        if "lesion" not in sample:
            return None
        cam = att.grad_cam(model, sample["image"][None].float())[0, 0]
        hot = cam >= self.OVERLAY_CAM_LEVEL * cam.max() if cam.max() > 0 else cam > 0
        none = np.zeros((0, 2 * self.config.spatial_dims))
        truth = torch.as_tensor(sample["lesion"])[0].numpy()
        return Overlay(truth, hot.numpy().astype(np.uint8), none, none)

    def augmentation(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        size = (self.config.image_size,) * self.config.spatial_dims
        crop = tuple(max(8, int(round(s * 0.875))) for s in size)
        return mt.Compose(
            [
                mt.RandFlipd(keys="image", prob=0.5, spatial_axis=0),
                mt.RandRotated(keys="image", range_x=0.26, prob=0.5, padding_mode="border"),
                mt.RandZoomd(
                    keys="image", min_zoom=0.9, max_zoom=1.1, prob=0.5, padding_mode="edge"
                ),
                mt.RandSpatialCropd(keys="image", roi_size=crop, random_size=False),
                mt.Resized(keys="image", spatial_size=size),
                mt.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
                mt.RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.5),
            ]
        )
