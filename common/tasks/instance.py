"""Instance segmentation: detect each lesion, then mask it (Retina U-Net)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn

from common import manifest as mf
from common.instance_metrics import INSTANCE_METRICS, InstanceStates
from common.models import SEGMENTATION_KEY
from common.tasks.base import Batch, register_task
from common.tasks.detection import DetectionTask, semantic_map

if TYPE_CHECKING:
    from common.synthetic import SiteData


class SegmentationTap(nn.Module):
    """Hands a Retina U-Net's detection maps to MONAI's detector, which knows only those, and
    keeps its segmentation logits in ``segmentation``."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.segmentation: torch.Tensor | None = None

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        outputs = dict(self.network(images))
        self.segmentation = outputs.pop(SEGMENTATION_KEY)
        return outputs


@register_task
class InstanceTask(DetectionTask):
    """Instance segmentation: detect each lesion, then mask it (Retina U-Net).

    A sample's ``"label"`` is the detection target plus ``"masks"``: ``(k, *spatial)``, one
    binary mask per box. The loss is RetinaNet's (focal and box regression) plus Dice and
    cross-entropy on the semantic segmentation (the union of the masks, by class). Each
    detected box becomes an instance whose mask is the segmentation of its class inside the
    box. Metrics: mask AP, box AP and per-instance Dice (``common.instance_metrics``).
    """

    name = "instance"
    primary_metric = "ap50"
    headline_metrics = ("ap50", "map", "instance_dice", "box_ap50")
    metrics = INSTANCE_METRICS
    required_columns = (mf.INSTANCE_MASK,)
    box_column = None
    mask_column = mf.INSTANCE_MASK
    numbered_instances = True
    default_model = "retina-unet"
    round_metrics: ClassVar[tuple[str, ...]] = ("map", "instance_dice", "box_ap50")
    TARGET_IMAGES = ("masks",)

    def train_step(self, model: nn.Module, batch: Batch, loss_function: nn.Module) -> torch.Tensor:
        tap = SegmentationTap(model)
        detector = self.detector(tap)
        detector.train()
        losses = detector(list(batch["image"]), list(batch["label"]))
        assert tap.segmentation is not None
        semantic = torch.stack([semantic_map(t, batch["image"].shape[2:]) for t in batch["label"]])
        segmentation = self._segmentation_loss(tap.segmentation.float(), semantic)
        return (
            losses[detector.cls_key].float() + losses[detector.box_reg_key].float() + segmentation
        )

    _segmentation_loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)

    @classmethod
    def empty_states(cls, num_classes: int) -> InstanceStates:
        return InstanceStates(max(num_classes - 1, 1))

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Batch) -> tuple[Any, Any]:
        tap = SegmentationTap(model)
        detector = self.detector(tap)
        detector.eval()
        outputs = detector(list(batch["image"]), use_inferer=False)
        assert tap.segmentation is not None
        semantic = tap.segmentation.argmax(dim=1)
        predictions = []
        for output, classes in zip(outputs, semantic, strict=True):
            boxes = output["boxes"].float()
            labels = output["labels"]
            predictions.append(
                {
                    "boxes": boxes,
                    "labels": labels,
                    "scores": output[detector.pred_score_key].float(),
                    "masks": masks_in_boxes(classes, boxes, labels),
                }
            )
        return predictions, list(batch["label"])

    @classmethod
    def site_target(
        cls, item: Mapping[str, Any], label: torch.Tensor, boxes: np.ndarray | None
    ) -> dict[str, torch.Tensor]:
        """One mask and box per instance of the preprocessed instance map, all of the row's
        class; an instance that resizing merged into another raises."""
        instances = torch.as_tensor(item["mask"], dtype=torch.int64)
        target = instance_target(instances, label)
        if len(target["masks"]) != item["mask_values"]:
            raise ValueError(
                f"{item['mask_values'] - len(target['masks'])} of {item['mask_values']} "
                "instances vanish at the training size (they share voxels there); raise "
                "image-size"
            )
        return target

    def synthetic_targets(self, data: SiteData) -> list[dict[str, torch.Tensor]]:
        if data.instances is None:
            raise ValueError(f"synthetic site {data.profile.name} has no instance maps")
        return [
            instance_target(instances, kind)
            for instances, kind in zip(data.instances, data.labels, strict=True)
        ]


def instance_target(instances: torch.Tensor, kind: int | torch.Tensor) -> dict[str, torch.Tensor]:
    """An instance target from an instance map ``(1, *spatial)`` (0 background, ``k`` on
    instance ``k``): one mask and box per instance, every instance of the image's ``kind``
    (object class ``kind - 1``, at least 0)."""
    ids = [int(i) for i in torch.unique(instances) if i > 0]
    masks = torch.stack([instances[0] == i for i in ids]) if ids else None
    dims = instances.dim() - 1
    if masks is None:
        return {
            "boxes": torch.zeros((0, 2 * dims)),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros((0, *instances.shape[1:]), dtype=torch.bool),
        }
    return {
        "boxes": mask_boxes(masks),
        "labels": torch.full((len(ids),), max(int(kind) - 1, 0), dtype=torch.int64),
        "masks": masks,
    }


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """The half-open bounding box ``(lo..., hi...)`` of each non-empty mask ``(k, *spatial)``."""
    dims = masks.dim() - 1
    boxes = torch.zeros((masks.shape[0], 2 * dims))
    for i, mask in enumerate(masks):
        where = torch.nonzero(mask)
        boxes[i, :dims] = where.min(0).values
        boxes[i, dims:] = where.max(0).values + 1
    return boxes


def masks_in_boxes(
    classes: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Per box, the voxels inside it that the semantic map ``classes`` gives its class
    (object class ``c`` is segmentation class ``c + 1``)."""
    masks = torch.zeros((boxes.shape[0], *classes.shape), dtype=torch.bool, device=classes.device)
    dims = classes.dim()
    for i, (box, label) in enumerate(zip(boxes, labels, strict=True)):
        region = tuple(
            slice(max(int(box[d].floor()), 0), int(box[d + dims].ceil())) for d in range(dims)
        )
        masks[i][region] = classes[region] == label + 1
    return masks
