"""Semantic segmentation: a label map per image (class 0 background)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from monai import transforms as mt
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import nn

from common import manifest as mf
from common.errors import ConfigError
from common.seg_metrics import SEGMENTATION_METRICS, SegmentationStates
from common.tasks.base import (
    Batch,
    ModelConfig,
    Overlay,
    Task,
    inverse_frequency_weights,
    register_task,
)

if TYPE_CHECKING:
    from common.synthetic import SiteData


@register_task
class SegmentationTask(Task):
    """Semantic segmentation: a label map per image, class 0 background (``num-classes``
    counts it). Dice plus cross-entropy loss; volumes larger than the training size are
    predicted with MONAI's sliding-window inference over ``image-size`` patches."""

    name = "segmentation"
    #: The per-case mean (MONAI's mean Dice), not the global voxel Dice: it has an interval,
    #: so the report's subgroup gaps have one too, and best-round selection agrees with it.
    primary_metric = "dice_case_mean"
    headline_metrics = ("dice_case_mean", "dice", "hd95_mean", "case_detection_rate")
    metrics = SEGMENTATION_METRICS
    required_columns = (mf.MASK,)
    mask_column = mf.MASK
    threshold_note = "segmentation: each voxel takes its arg-max class, no threshold"
    default_model = "unet"
    round_metrics: ClassVar[tuple[str, ...]] = ("dice", "hd95_mean")

    #: Four 2x downsamplings with at least 2 voxels left at the bottom.
    MIN_IMAGE_SIZE = 32
    SIZE_MULTIPLE = 16

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        size = config.image_size
        if size < self.MIN_IMAGE_SIZE or size % self.SIZE_MULTIPLE:
            raise ConfigError(
                f"run-config key image-size must be a multiple of {self.SIZE_MULTIPLE} and at "
                f"least {self.MIN_IMAGE_SIZE} for segmentation networks, got {size}"
            )

    def output_channels(self) -> int:
        return self.config.num_classes

    def loss_function(self, train_labels: torch.Tensor | None, balance: bool) -> nn.Module:
        # Dice is insensitive to class imbalance by construction; ``balance`` changes nothing.
        return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)

    def sample_weights(self, labels: torch.Tensor) -> torch.Tensor:
        # Images with and without a lesion weigh the same in total.
        return inverse_frequency_weights((labels > 0).long(), 2)[(labels > 0).long()]

    @classmethod
    def empty_states(cls, num_classes: int) -> SegmentationStates:
        return SegmentationStates(num_classes)

    def predict(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        image = batch["image"]
        patch = (self.config.image_size,) * self.config.spatial_dims
        if any(size > edge for size, edge in zip(image.shape[2:], patch, strict=True)):
            logits = sliding_window_inference(
                image, roi_size=patch, sw_batch_size=4, predictor=model, overlap=0.25
            )
        else:
            logits = model(image)
        return torch.softmax(torch.as_tensor(logits).float(), dim=1), batch["label"]

    def overlay(self, model: nn.Module, sample: dict[str, Any]) -> Overlay | None:
        batch = {"image": sample["image"][None], "label": torch.as_tensor(sample["label"])[None]}
        with torch.no_grad():
            probabilities, target = self.predict(model, batch)
        none = np.zeros((0, 2 * self.config.spatial_dims))
        return Overlay(target[0, 0].numpy(), probabilities.argmax(1)[0].numpy(), none, none)

    @classmethod
    def site_target(
        cls, item: Mapping[str, Any], label: torch.Tensor, boxes: np.ndarray | None
    ) -> torch.Tensor:
        return torch.as_tensor(item["mask"], dtype=torch.int64)

    def synthetic_targets(self, data: SiteData) -> torch.Tensor | None:
        if data.masks is None:
            raise ValueError(f"synthetic site {data.profile.name} has no lesion masks")
        return data.masks.long()

    def augmentation(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        keys = ["image", "label"]
        return mt.Compose(
            [
                mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
                mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
                mt.RandRotate90d(keys=keys, prob=0.5, spatial_axes=(0, 1)),
                mt.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
                mt.RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.5),
            ]
        )
