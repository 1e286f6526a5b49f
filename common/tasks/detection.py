"""Lesion detection with boxes: RetinaNet with a feature pyramid and focal loss."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from monai import transforms as mt
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.transforms import dictionary as mdt
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from torch import nn

from common import manifest as mf
from common.det_metrics import DETECTION_METRICS, DetectionStates
from common.models import ResNetFPN
from common.tasks.base import Batch, Overlay, Task, inverse_frequency_weights, register_task

if TYPE_CHECKING:
    from common.synthetic import SiteData


class ATSSRetinaNetDetector(RetinaNetDetector):
    """MONAI's RetinaNet detector matching anchors with MONAI's ATSS matcher only.

    MONAI's own anchor matching first checks ``isinstance(matcher, torchvision's Matcher)``,
    which fails where torchvision is not installed; ATSS (Zhang et al., 2020) needs nothing
    from torchvision.
    """

    def compute_anchor_matched_idxs(
        self,
        anchors: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        num_anchor_locs_per_level: Sequence[int],
    ) -> list[torch.Tensor]:
        matched = []
        for anchors_i, targets_i in zip(anchors, targets, strict=True):
            boxes = targets_i[self.target_box_key]
            if boxes.numel() == 0:
                unmatched = torch.full((anchors_i.size(0),), -1, dtype=torch.int64)
                matched.append(unmatched.to(anchors_i.device))
                continue
            _, index = self.proposal_matcher(
                boxes.to(anchors_i.device),
                anchors_i,
                num_anchor_locs_per_level,
                self.num_anchors_per_loc,
            )
            matched.append(index)
        return matched


@register_task
class DetectionTask(Task):
    """Lesion detection with boxes: RetinaNet with a feature pyramid and focal loss.

    A sample's ``"label"`` is ``{"boxes": (k, 2 * dims) corners, "labels": (k,) classes}``
    with object classes from 0 (a manifest's lesion kind minus one); ``num-classes`` counts
    "no finding" as in classification, so there are ``num-classes - 1`` object classes.
    """

    name = "detection"
    primary_metric = "ap50"
    headline_metrics = ("ap50", "map", "froc", "sensitivity_at_1_fp")
    metrics = DETECTION_METRICS
    required_columns = (mf.BOXES,)
    box_column: ClassVar[str | None] = mf.BOXES
    threshold_note = "detection: every box scoring >= 0.02 counts, ranked by score"
    default_model = "retinanet"
    round_metrics: ClassVar[tuple[str, ...]] = ("map", "froc")
    #: Anchor edge lengths at 64 px in 2D, scaled with ``image-size`` and, in 3D, with the
    #: synthetic lesions' larger size relative to the field of view: the lesions' range.
    ANCHOR_SIZES_AT_64 = (4.0, 8.0, 14.0)
    #: Lesion size relative to the field of view by spatial dimensions (3D lesions are twice
    #: as wide; the synthetic generator's ``LESION_SCALE``, which a test keeps equal).
    ANCHOR_SCALE: ClassVar[dict[int, float]] = {2: 1.0, 3: 2.0}

    def output_channels(self) -> int:
        return max(self.config.num_classes - 1, 1)

    def loss_function(self, train_labels: torch.Tensor | None, balance: bool) -> nn.Module:
        # The detector computes focal and box-regression losses itself.
        return nn.Identity()

    def sample_weights(self, labels: torch.Tensor) -> torch.Tensor:
        return inverse_frequency_weights((labels > 0).long(), 2)[(labels > 0).long()]

    def detector(self, model: nn.Module) -> ATSSRetinaNetDetector:
        """A detector around ``model`` (a RetinaNet's detection maps): anchors, matcher,
        sampler, box decoding."""
        dims = self.config.spatial_dims
        scale = self.config.image_size / 64.0 * self.ANCHOR_SCALE[dims]
        shapes = [(size * scale,) * dims for size in self.ANCHOR_SIZES_AT_64]
        anchors = AnchorGeneratorWithAnchorShape(
            feature_map_scales=ResNetFPN.FEATURE_STRIDES, base_anchor_shapes=shapes
        )
        detector = ATSSRetinaNetDetector(
            model, anchors, spatial_dims=dims, num_classes=self.output_channels(), size_divisible=8
        )
        detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
        detector.set_hard_negative_sampler(
            batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16
        )
        detector.set_target_keys(box_key="boxes", label_key="labels")
        detector.set_box_selector_parameters(
            score_thresh=0.02, topk_candidates_per_level=100, nms_thresh=0.2, detections_per_img=20
        )
        return detector

    def train_step(self, model: nn.Module, batch: Batch, loss_function: nn.Module) -> torch.Tensor:
        detector = self.detector(model)
        detector.train()
        losses = detector(list(batch["image"]), list(batch["label"]))
        return losses[detector.cls_key].float() + losses[detector.box_reg_key].float()

    @classmethod
    def empty_states(cls, num_classes: int) -> DetectionStates:
        # num-classes counts "no finding", as in classification; boxes have the rest.
        return DetectionStates(max(num_classes - 1, 1))

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Batch) -> tuple[Any, Any]:
        detector = self.detector(model)
        detector.eval()
        outputs = detector(list(batch["image"]), use_inferer=False)
        predictions = [
            {
                "boxes": o["boxes"].float(),
                "labels": o["labels"],
                "scores": o[detector.pred_score_key].float(),
            }
            for o in outputs
        ]
        return predictions, list(batch["label"])

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "label": [s["label"] for s in samples],
        }

    @classmethod
    def site_target(
        cls, item: Mapping[str, Any], label: torch.Tensor, boxes: np.ndarray | None
    ) -> dict[str, torch.Tensor]:
        """Corners and object classes of the row's boxes after preprocessing."""
        if boxes is None:
            raise ValueError("the row's boxes were not read")
        corners = torch.as_tensor(item["boxes"], dtype=torch.float32)
        if len(corners) != len(boxes):
            raise ValueError(
                f"{len(boxes) - len(corners)} of {len(boxes)} boxes were lost in preprocessing"
            )
        # boxes: (k, 2 * dims + 1), corners then the lesion kind
        return {
            "boxes": corners.reshape(-1, boxes.shape[1] - 1),
            "labels": torch.as_tensor(item["box_labels"], dtype=torch.int64).reshape(-1),
        }

    def synthetic_targets(self, data: SiteData) -> list[dict[str, torch.Tensor]]:
        return [boxes_target(boxes, self.config.spatial_dims) for boxes in data.boxes]

    def overlay(self, model: nn.Module, sample: dict[str, Any]) -> Overlay | None:
        predictions, targets = self.predict(model, self.collate([sample]))
        prediction, target = predictions[0], targets[0]
        keep = prediction["scores"] >= Overlay.SCORE
        shape = tuple(sample["image"].shape[1:])
        return Overlay(
            _union(target.get("masks"), target["labels"], shape),
            _union(prediction.get("masks", None), prediction["labels"], shape, keep),
            Overlay.boxes(target["boxes"]),
            Overlay.boxes(prediction["boxes"][keep]),
        )

    #: Keys of a sample's target that are images (flipped and rotated with the image).
    TARGET_IMAGES: ClassVar[tuple[str, ...]] = ()

    def augmentation(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """Flips on every axis and 90-degree rotations in the first plane, boxes moved with
        the image (MONAI's box transforms), and intensity changes."""
        images = ["image", *self.TARGET_IMAGES]
        flips = [
            mdt.RandFlipBoxd(images, "boxes", "image", prob=0.5, spatial_axis=axis)
            for axis in range(self.config.spatial_dims)
        ]
        return mt.Compose(
            [
                mt.Lambda(_unnest_target),
                *flips,
                mdt.RandRotateBox90d(images, "boxes", "image", prob=0.5, spatial_axes=(0, 1)),
                mt.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
                mt.RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.5),
                mt.Lambda(partial(_nest_target, keys=("boxes", "labels", *self.TARGET_IMAGES))),
            ]
        )


def boxes_target(boxes: Sequence[Sequence[float]], spatial_dims: int) -> dict[str, torch.Tensor]:
    """A detection target from ``[corners..., kind]`` boxes (kind 1 is object class 0)."""
    corners = torch.tensor([b[: 2 * spatial_dims] for b in boxes], dtype=torch.float32)
    kinds = torch.tensor([int(b[-1]) - 1 for b in boxes], dtype=torch.int64)
    return {"boxes": corners.reshape(-1, 2 * spatial_dims), "labels": kinds.clamp(min=0)}


def semantic_map(target: Mapping[str, torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """The long label map ``(1, *shape)`` of an instance target: object class + 1 on its
    masks, 0 elsewhere."""
    out = torch.zeros((1, *shape), dtype=torch.int64, device=target["masks"].device)
    for mask, label in zip(target["masks"], target["labels"], strict=True):
        out[0][mask.bool()] = label + 1
    return out


def _union(
    masks: torch.Tensor | None,
    labels: torch.Tensor,
    shape: tuple[int, ...],
    keep: torch.Tensor | None = None,
) -> np.ndarray:
    """The label map of instance masks (object class + 1), zeros without masks."""
    if masks is None:
        return np.zeros(shape, dtype=np.int64)
    if keep is not None:
        masks, labels = masks[keep], labels[keep]
    return semantic_map({"masks": masks, "labels": labels}, shape)[0].cpu().numpy()


def _unnest_target(sample: dict[str, Any]) -> dict[str, Any]:
    return {"image": sample["image"], **sample["label"]}


def _nest_target(sample: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    target = {key: torch.as_tensor(sample[key]) for key in keys}
    if "masks" in target:
        target["masks"] = target["masks"].bool()
    return {"image": torch.as_tensor(sample["image"]), "label": target}
