"""Object detection metrics whose states add up across sites (issue #5).

A site matches its predicted boxes to the ground truth with MONAI's COCO-style matcher
(``monai.apps.detection.metrics.matching.matching_batch``: greedy by score, each ground-truth
box matched at most once, at most ``max_detections`` boxes per image) at every IoU threshold,
then keeps, per threshold and class, two histograms of detection scores: matched (true
positive) and unmatched (false positive) detections, plus the number of ground-truth boxes
and of images. No box and no per-image value leaves the site.

From the summed histograms the server computes, per class and averaged over classes:

* AP at IoU 0.1 and 0.5 and mAP over IoU 0.50:0.95 (step 0.05), with COCO's 101-point
  interpolated precision; detections whose scores share a histogram bin enter the
  precision-recall curve together, so AP can differ from COCO's by the effect of reordering
  detections within one bin (1/``num_bins`` wide);
* FROC: sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per image at IoU 0.1
  (lesion detection's usual hit criterion), and its mean over 1, 2, 4 and 8.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou

from common import evaluation as ev
from common.errors import ConfigError
from common.intervals import MetricWithCI
from common.states import MetricInfo, SummableStates

IOU_THRESHOLDS: tuple[float, ...] = (0.1, *np.round(np.arange(0.5, 0.951, 0.05), 2).tolist())
FROC_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
FROC_IOU = 0.1
RECALL_POINTS = np.linspace(0.0, 1.0, 101)

DETECTION_METRICS: dict[str, MetricInfo] = {
    info.name: info
    for info in (
        MetricInfo("map", True),
        MetricInfo("ap50", True),
        MetricInfo("ap10", True),
        MetricInfo("froc", True),
        *(MetricInfo(f"sensitivity_at_{rate:g}_fp", True) for rate in FROC_RATES),
        MetricInfo("loss", False),
    )
}


@dataclass
class DetectionStates(SummableStates):
    """Summable detection states.

    Parameters
    ----------
    num_classes : int
        Object classes (not counting background).
    num_bins : int
        Score histogram bins over [0, 1].
    max_detections : int
        Highest-scoring detections kept per image, as COCO's ``maxDets``.
    """

    num_classes: int
    num_bins: int = 1000
    max_detections: int = 100
    arrays: dict[str, np.ndarray] = field(init=False)
    count: int = field(init=False, default=0)
    loss_sum: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")
        shape = (len(IOU_THRESHOLDS), self.num_classes, self.num_bins)
        self.arrays = {
            "tp": np.zeros(shape),
            "fp": np.zeros(shape),
            "gt": np.zeros(self.num_classes),
        }

    @property
    def images(self) -> int:
        """Images seen (the states' case count)."""
        return self.count

    def update(
        self,
        predictions: Sequence[Mapping[str, torch.Tensor | np.ndarray]],
        targets: Sequence[Mapping[str, torch.Tensor | np.ndarray]],
    ) -> None:
        """Add a batch: per image ``{"boxes", "labels", "scores"}`` predicted and
        ``{"boxes", "labels"}`` true (boxes as corners ``x0, y0, (z0,) x1, y1, (z1)``)."""
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
        if not predictions:
            return
        self._accumulate(self._match(predictions, targets))
        self.count += len(predictions)

    def _match(
        self,
        predictions: Sequence[Mapping[str, torch.Tensor | np.ndarray]],
        targets: Sequence[Mapping[str, torch.Tensor | np.ndarray]],
    ) -> list[dict[int, dict[str, np.ndarray]]]:
        """MONAI's COCO-style matches of each image, per class, by box IoU."""
        return matching_batch(  # type: ignore[no-any-return]
            iou_fn=_box_iou,
            iou_thresholds=IOU_THRESHOLDS,
            pred_boxes=[_numpy(p["boxes"]) for p in predictions],
            pred_classes=[_classes(p) for p in predictions],
            pred_scores=[_numpy(p["scores"]) for p in predictions],
            gt_boxes=[_numpy(t["boxes"]) for t in targets],
            gt_classes=[_classes(t) for t in targets],
            max_detections=self.max_detections,
        )

    def _accumulate(
        self, results: Iterable[Mapping[int, Mapping[str, np.ndarray]]], kind: str = ""
    ) -> None:
        """Add matched detections to the score histograms ``{kind}tp``/``{kind}fp``."""
        tp, fp, gt = self.arrays[f"{kind}tp"], self.arrays[f"{kind}fp"], self.arrays[f"{kind}gt"]
        for image in results:
            for cls, match in image.items():
                if not 0 <= cls < self.num_classes:
                    raise ValueError(f"class {cls} outside [0, {self.num_classes})")
                scores = np.asarray(match["dtScores"], dtype=np.float64)
                matched = np.asarray(match["dtMatches"], dtype=bool)
                ignored = np.asarray(match["dtIgnore"], dtype=bool)
                bins = np.clip((scores * self.num_bins).astype(np.int64), 0, self.num_bins - 1)
                for t in range(len(IOU_THRESHOLDS)):
                    np.add.at(tp[t, cls], bins[matched[t] & ~ignored[t]], 1)
                    np.add.at(fp[t, cls], bins[~matched[t] & ~ignored[t]], 1)
                gt_ignore = np.asarray(match["gtIgnore"], dtype=bool).reshape(-1)
                gt[cls] += (~gt_ignore).sum()

    # ---------------------------------------------------------------- compute
    def curve(
        self, iou: float, cls: int, kind: str = ""
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Recall, precision and false positives per image at every score-bin edge, from the
        highest scores down (``kind``: the prefix of the histograms, e.g. ``box_``)."""
        t = IOU_THRESHOLDS.index(iou)
        tp = np.cumsum(self.arrays[f"{kind}tp"][t, cls][::-1])
        fp = np.cumsum(self.arrays[f"{kind}fp"][t, cls][::-1])
        gt = self.arrays[f"{kind}gt"][cls]
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = tp / gt if gt > 0 else np.full_like(tp, np.nan)
            precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        fp_per_image = fp / self.images if self.images else np.full_like(fp, np.nan)
        return recall, precision, fp_per_image

    def average_precision(self, iou: float, cls: int, kind: str = "") -> float:
        """COCO's 101-point interpolated AP (NaN without ground-truth objects)."""
        if self.arrays[f"{kind}gt"][cls] == 0:
            return math.nan
        recall, precision, _ = self.curve(iou, cls, kind)
        t = IOU_THRESHOLDS.index(iou)
        keep = (self.arrays[f"{kind}tp"][t, cls][::-1] > 0) | (
            self.arrays[f"{kind}fp"][t, cls][::-1] > 0
        )
        recall, precision = recall[keep], precision[keep]
        if recall.size == 0:
            return 0.0
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        index = np.searchsorted(recall, RECALL_POINTS, side="left")
        values = np.where(index < recall.size, envelope[np.minimum(index, recall.size - 1)], 0.0)
        return float(values.mean())

    def froc(self, cls: int) -> dict[float, float]:
        """Sensitivity (recall at IoU 0.1) at each rate of false positives per image."""
        if self.arrays["gt"][cls] == 0 or self.images == 0:
            return {rate: math.nan for rate in FROC_RATES}
        recall, _, fp_per_image = self.curve(FROC_IOU, cls)
        out = {}
        for rate in FROC_RATES:
            within = fp_per_image <= rate
            out[rate] = float(recall[within].max()) if within.any() else 0.0
        return out

    def mean_ap(self, iou: float | None, kind: str = "") -> float:
        """AP at ``iou`` averaged over classes; ``None``: COCO's mAP over IoU 0.50:0.95."""
        ious = IOU_THRESHOLDS[1:] if iou is None else (iou,)
        return _nanmean(
            [
                _nanmean([self.average_precision(t, c, kind) for t in ious])
                for c in range(self.num_classes)
            ]
        )

    def compute(self) -> dict[str, float]:
        classes = range(self.num_classes)
        out = {"ap10": self.mean_ap(0.1), "ap50": self.mean_ap(0.5), "map": self.mean_ap(None)}
        frocs = [self.froc(c) for c in classes]
        for rate in FROC_RATES:
            out[f"sensitivity_at_{rate:g}_fp"] = _nanmean([f[rate] for f in frocs])
        out["froc"] = _nanmean([out[f"sensitivity_at_{r:g}_fp"] for r in (1.0, 2.0, 4.0, 8.0)])
        # Detection states hold no loss (RetinaNet computes it only in training): NaN here
        # tells the trainer there is no validation loss to stop early on.
        out["loss"] = math.nan
        return out

    def summary(self, confidence: float, threshold: float) -> dict[str, MetricWithCI]:
        """AP, mAP and FROC as point estimates over the images; the sensitivity at 1 and 4
        false positives per image with Wilson intervals over the ground-truth lesions. Every
        box scoring at least the selector's floor counts, ranked by score: ``threshold`` is
        unused."""
        nan = math.nan
        values = self.compute()
        images = int(self.images)
        lesions = int(self.arrays["gt"].sum())
        out = {
            name: MetricWithCI(name, values[name], nan, nan, "point estimate", images)
            for name in ("ap50", "map", "ap10", "froc")
        }
        for name in ("sensitivity_at_1_fp", "sensitivity_at_4_fp"):
            value = values[name]
            if math.isfinite(value) and lesions:
                _, low, high = ev.wilson_ci(int(round(value * lesions)), lesions, 1 - confidence)
                out[name] = MetricWithCI(name, value, low, high, "Wilson", lesions)
            else:
                out[name] = MetricWithCI(name, value, nan, nan, "point estimate", lesions)
        return out

    def per_class(self, confidence: float = 0.95) -> list[dict[str, float]]:
        """AP at IoU 0.5 per object class."""
        return [
            {"class": c, "ap50": self.average_precision(0.5, c)} for c in range(self.num_classes)
        ]


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(box_iou(a, b))


def _classes(item: Mapping[str, torch.Tensor | np.ndarray]) -> np.ndarray:
    return _numpy(item["labels"]).astype(np.int64)


def _numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan
