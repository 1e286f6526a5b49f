"""Instance segmentation metrics whose states add up across sites (issue #5).

An instance is a mask with a class and, for predictions, a score. A site keeps:

* the score histograms of :class:`common.det_metrics.DetectionStates`, with predictions matched
  to ground-truth instances by **mask IoU** (COCO's ``segm`` evaluation): mask AP at IoU 0.1
  and 0.5, mask mAP over IoU 0.50:0.95 and the FROC, under the detection metric names;
* the same histograms matched by **box IoU** (``box_ap50``, ``box_map``), so the box quality
  of a detect-then-mask network shows beside its masks;
* per class, the count, sum and sum of squares of the **per-instance Dice**: each ground-truth
  instance's best Dice with a predicted instance of its class scoring at least
  ``score_threshold`` (0 when none overlaps it): the ground-truth side of the "best Dice" of the
  CVPPP leaf segmentation challenge (Scharr et al., 2016).

No mask and no per-instance value leaves the site.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from monai.apps.detection.metrics.matching import matching_batch

from common.det_metrics import DETECTION_METRICS, IOU_THRESHOLDS, DetectionStates, _numpy
from common.intervals import MetricWithCI, z_value
from common.states import MetricInfo

INSTANCE_METRICS: dict[str, MetricInfo] = {
    **DETECTION_METRICS,
    **{
        info.name: info
        for info in (
            MetricInfo("box_ap50", True),
            MetricInfo("box_map", True),
            MetricInfo("instance_dice", True),
            MetricInfo("instance_dice_sd", False),
        )
    },
}

Item = Mapping[str, torch.Tensor | np.ndarray]


def mask_overlaps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersections ``(len(a), len(b))`` and the sizes of ``a``'s and ``b``'s masks, for
    masks flattened to ``(k, voxels)``."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    return a @ b.T, a.sum(1), b.sum(1)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every pair of flattened masks (0 for two empty masks)."""
    inter, size_a, size_b = mask_overlaps(a, b)
    union = size_a[:, None] + size_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


@dataclass
class InstanceStates(DetectionStates):
    """Summable instance segmentation states.

    ``update`` takes, per image, ``{"masks": (k, *spatial) bool, "boxes", "labels", "scores"}``
    predicted and ``{"masks", "boxes", "labels"}`` true.

    Parameters
    ----------
    score_threshold : float
        Predicted instances scoring below this take no part in the per-instance Dice (AP ranks
        every prediction).
    """

    score_threshold: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        shape = self.arrays["tp"].shape
        self.arrays.update(
            box_tp=np.zeros(shape),
            box_fp=np.zeros(shape),
            box_gt=np.zeros(self.num_classes),
            # count, sum and sum of squares of the per-instance Dice, per class
            dice=np.zeros((self.num_classes, 3)),
        )

    def update(self, predictions: Sequence[Item], targets: Sequence[Item]) -> None:
        super().update(predictions, targets)
        if predictions:
            self._accumulate(super()._match(predictions, targets), "box_")
        for prediction, target in zip(predictions, targets, strict=True):
            self._add_dice(prediction, target)

    def _match(
        self, predictions: Sequence[Item], targets: Sequence[Item]
    ) -> list[dict[int, dict[str, np.ndarray]]]:
        """Matches by mask IoU. MONAI's matcher takes boxes and an IoU function; each
        instance's "box" here is its index, and the function looks the IoU up."""
        results = []
        for prediction, target in zip(predictions, targets, strict=True):
            ious = mask_iou(_flat(prediction["masks"]), _flat(target["masks"]))
            pred_index = np.arange(ious.shape[0], dtype=np.float64)[:, None]
            gt_index = np.arange(ious.shape[1], dtype=np.float64)[:, None]
            results += matching_batch(
                iou_fn=partial(_lookup, ious),
                iou_thresholds=IOU_THRESHOLDS,
                pred_boxes=[pred_index],
                pred_classes=[_numpy(prediction["labels"]).astype(np.int64)],
                pred_scores=[_numpy(prediction["scores"])],
                gt_boxes=[gt_index],
                gt_classes=[_numpy(target["labels"]).astype(np.int64)],
                max_detections=self.max_detections,
            )
        return results

    def _add_dice(self, prediction: Item, target: Item) -> None:
        predicted = _flat(prediction["masks"])
        true = _flat(target["masks"])
        pred_classes = _numpy(prediction["labels"]).astype(np.int64)
        true_classes = _numpy(target["labels"]).astype(np.int64)
        confident = _numpy(prediction["scores"]) >= self.score_threshold
        for cls in np.unique(true_classes):
            if not 0 <= cls < self.num_classes:
                raise ValueError(f"class {cls} outside [0, {self.num_classes})")
            gt = true[true_classes == cls]
            candidates = predicted[(pred_classes == cls) & confident]
            if candidates.shape[0]:
                inter, size_gt, size_pred = mask_overlaps(gt, candidates)
                total = size_gt[:, None] + size_pred[None, :]
                dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 0.0).max(1)
            else:
                dice = np.zeros(gt.shape[0])
            self.arrays["dice"][cls] += (dice.size, dice.sum(), np.square(dice).sum())

    def compute(self) -> dict[str, float]:
        out = super().compute()
        out["box_ap50"] = self.mean_ap(0.5, "box_")
        out["box_map"] = self.mean_ap(None, "box_")
        count, total, squares = self.arrays["dice"].sum(0)
        mean = float(total / count) if count else math.nan
        out["instance_dice"] = mean
        out["instance_dice_sd"] = (
            math.sqrt(max(squares / count - mean**2, 0.0) * count / (count - 1))
            if count > 1
            else math.nan
        )
        return out

    def summary(self, confidence: float, threshold: float) -> dict[str, MetricWithCI]:
        """The detection summary over masks, box AP as point estimates, and the mean
        per-instance Dice with a normal interval."""
        out = super().summary(confidence, threshold)
        values = self.compute()
        nan = math.nan
        for name in ("box_ap50", "box_map"):
            out[name] = MetricWithCI(name, values[name], nan, nan, "point estimate", self.images)
        mean, sd, n = values["instance_dice"], values["instance_dice_sd"], self.instances
        half = z_value(1 - confidence) * sd / math.sqrt(n) if n > 1 and math.isfinite(sd) else nan
        out["instance_dice"] = MetricWithCI(
            "instance_dice", mean, mean - half, mean + half, "normal (mean of instances)", n
        )
        return out

    @property
    def instances(self) -> int:
        """Ground-truth instances seen."""
        return int(self.arrays["dice"][:, 0].sum())


def _flat(masks: torch.Tensor | np.ndarray) -> np.ndarray:
    array = _numpy(masks)
    return array.reshape(array.shape[0], int(np.prod(array.shape[1:]))) > 0


def _lookup(ious: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """The IoUs of instances given by index "boxes" ``(k, 1)``."""
    return ious[np.ix_(pred[:, 0].astype(np.int64), gt[:, 0].astype(np.int64))]
