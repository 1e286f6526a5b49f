"""Semantic segmentation metrics whose states add up across sites.

Per foreground class (class 0 is background), a site keeps:

* voxel sums ``tp``, ``fp``, ``fn`` over all its cases: the pooled *global* Dice
  ``2 tp / (2 tp + fp + fn)`` and IoU ``tp / (tp + fp + fn)``;
* per-case Dice and IoU, as a sum, a sum of squares and a 1/``num_bins`` histogram over [0, 1]:
  the pooled per-case mean, standard deviation and median (to within half a bin), over the
  cases whose ground truth holds the class (MONAI's ``ignore_empty``);
* the 95th-percentile Hausdorff distance (HD95, in voxels) of every case where both the
  prediction and the ground truth hold the class, as a sum, a sum of squares and a histogram
  of ``hd_bin_width``-voxel bins: the pooled mean, spread and median; cases whose ground truth
  holds the class but whose prediction misses it entirely are counted (``missed``), as are
  cases with the class predicted where the ground truth has none (``false_positive_cases``);
* the summed per-case mean voxel cross-entropy and the number of cases.

The server adds the states of all sites; every number is a pooled value over all cases, never
an average of per-site averages, and no per-case value leaves a site.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from monai.metrics.hausdorff_distance import compute_hausdorff_distance

from common import evaluation as ev
from common.errors import ConfigError
from common.intervals import MetricWithCI
from common.states import MetricInfo, SummableStates, mean_of_finite

SEGMENTATION_METRICS: dict[str, MetricInfo] = {
    info.name: info
    for info in (
        MetricInfo("dice", True),
        MetricInfo("dice_case_mean", True),
        MetricInfo("dice_case_std", False),
        MetricInfo("dice_case_median", True),
        MetricInfo("iou", True),
        MetricInfo("iou_case_mean", True),
        MetricInfo("hd95_mean", False),
        MetricInfo("hd95_median", False),
        MetricInfo("missed_cases", False),
        MetricInfo("false_positive_cases", False),
        MetricInfo("loss", False),
    )
}


@dataclass
class SegmentationStates(SummableStates):
    """Summable states of per-class segmentation metrics.

    Parameters
    ----------
    num_classes : int
        Classes including background (a binary lesion mask has 2).
    num_bins : int
        Bins of the per-case Dice and IoU histograms over [0, 1].
    hd_bins, hd_bin_width : int, float
        HD95 histogram: ``hd_bins`` bins of ``hd_bin_width`` voxels; larger distances fall in
        the last bin (the mean uses the exact sums).
    """

    num_classes: int
    num_bins: int = 100
    hd_bins: int = 200
    hd_bin_width: float = 0.5
    #: Names of the summed arrays, each ``(num_classes - 1, ...)``.
    ARRAYS: ClassVar[tuple[str, ...]] = (
        "tp",
        "fp",
        "fn",
        "dice_sum",
        "dice_sumsq",
        "dice_count",
        "dice_hist",
        "iou_sum",
        "iou_hist",
        "hd_sum",
        "hd_sumsq",
        "hd_count",
        "hd_hist",
        "missed",
        "false_positive_cases",
    )
    arrays: dict[str, np.ndarray] = field(init=False)
    loss_sum: float = field(init=False, default=0.0)
    count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2 (background + 1), got {self.num_classes}")
        k = self.num_classes - 1
        shapes = {"dice_hist": (k, self.num_bins), "iou_hist": (k, self.num_bins)}
        shapes["hd_hist"] = (k, self.hd_bins)
        self.arrays = {name: np.zeros(shapes.get(name, (k,))) for name in self.ARRAYS}

    # ----------------------------------------------------------------- update
    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: class probabilities ``(N, C, *spatial)`` and labels ``(N, 1, *spatial)``."""
        if prediction.ndim < 3 or prediction.shape[1] != self.num_classes:
            raise ValueError(
                f"prediction must be (N, {self.num_classes}, *spatial), "
                f"got {tuple(prediction.shape)}"
            )
        labels = target.long().reshape(prediction.shape[0], *prediction.shape[2:])
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"target labels must lie in [0, {self.num_classes})")
        picked = prediction.float().gather(1, labels.unsqueeze(1)).clamp_min(1e-15)
        self.loss_sum += float(-picked.log().flatten(1).mean(1).sum())
        self.update_labels(prediction.argmax(dim=1), labels)

    def update_labels(self, predicted: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of predicted and true label maps, both ``(N, *spatial)``."""
        n = predicted.shape[0]
        classes = torch.arange(1, self.num_classes, device=predicted.device)
        shape = (n, self.num_classes - 1, *predicted.shape[1:])
        pred = predicted.unsqueeze(1) == classes.view(1, -1, *[1] * (predicted.ndim - 1))
        true = labels.unsqueeze(1) == classes.view(1, -1, *[1] * (labels.ndim - 1))
        pred, true = pred.expand(shape), true.expand(shape)
        dims = tuple(range(2, pred.ndim))
        tp = (pred & true).sum(dims).double().cpu().numpy()
        fp = (pred & ~true).sum(dims).double().cpu().numpy()
        fn = (~pred & true).sum(dims).double().cpu().numpy()
        has_true = true.flatten(2).any(2).cpu().numpy()
        has_pred = pred.flatten(2).any(2).cpu().numpy()
        a = self.arrays
        a["tp"] += tp.sum(0)
        a["fp"] += fp.sum(0)
        a["fn"] += fn.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            dice = np.where(has_true, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)
            iou = np.where(has_true, tp / np.maximum(tp + fp + fn, 1), np.nan)
        both = has_true & has_pred
        hd = np.full(has_true.shape, np.nan)
        if both.any():
            cases = torch.from_numpy(both.any(1)).to(pred.device)
            with warnings.catch_warnings():
                # MONAI warns about empty masks; those cases are excluded below.
                warnings.filterwarnings("ignore", message=".* is all 0")
                # MONAI 1.6 calls one of its own deprecated arguments internally.
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy")
                distances = compute_hausdorff_distance(
                    pred[cases].float(), true[cases].float(), include_background=True, percentile=95
                )
            hd[both.any(1)] = distances.cpu().numpy()
            hd = np.where(both, hd, np.nan)
        for c in range(self.num_classes - 1):
            d, j, h = dice[:, c], iou[:, c], hd[:, c]
            d, j, h = d[np.isfinite(d)], j[np.isfinite(j)], h[np.isfinite(h)]
            a["dice_sum"][c] += d.sum()
            a["dice_sumsq"][c] += (d**2).sum()
            a["dice_count"][c] += d.size
            np.add.at(a["dice_hist"][c], _unit_bins(d, self.num_bins), 1)
            a["iou_sum"][c] += j.sum()
            np.add.at(a["iou_hist"][c], _unit_bins(j, self.num_bins), 1)
            a["hd_sum"][c] += h.sum()
            a["hd_sumsq"][c] += (h**2).sum()
            a["hd_count"][c] += h.size
            bins = np.clip((h / self.hd_bin_width).astype(np.int64), 0, self.hd_bins - 1)
            np.add.at(a["hd_hist"][c], bins, 1)
        a["missed"] += (has_true & ~has_pred).sum(0)
        a["false_positive_cases"] += (~has_true & has_pred).sum(0)
        self.count += n

    # ---------------------------------------------------------------- compute
    def per_class(self, confidence: float = 0.95) -> list[dict[str, float]]:
        """Metrics of each foreground class (NaN where no case defines them)."""
        a = self.arrays
        rows = []
        for c in range(self.num_classes - 1):
            tp, fp, fn = a["tp"][c], a["fp"][c], a["fn"][c]
            n_dice, n_hd = a["dice_count"][c], a["hd_count"][c]
            rows.append(
                {
                    "class": c + 1,
                    "dice": _ratio(2 * tp, 2 * tp + fp + fn),
                    "iou": _ratio(tp, tp + fp + fn),
                    "dice_case_mean": _ratio(a["dice_sum"][c], n_dice),
                    "dice_case_std": _std(a["dice_sum"][c], a["dice_sumsq"][c], n_dice),
                    "dice_case_median": _median(a["dice_hist"][c], 1.0 / self.num_bins),
                    "iou_case_mean": _ratio(a["iou_sum"][c], n_dice),
                    "hd95_mean": _ratio(a["hd_sum"][c], n_hd),
                    "hd95_std": _std(a["hd_sum"][c], a["hd_sumsq"][c], n_hd),
                    "hd95_median": _median(a["hd_hist"][c], self.hd_bin_width),
                    "cases": n_dice,
                    "missed_cases": a["missed"][c],
                    "false_positive_cases": a["false_positive_cases"][c],
                }
            )
        return rows

    def compute(self) -> dict[str, float]:
        """Metrics averaged over the foreground classes, and the mean loss per case."""
        rows = self.per_class()
        out = {
            name: mean_of_finite([r[name] for r in rows])
            for name in SEGMENTATION_METRICS
            if name != "loss"
        }
        out["missed_cases"] = float(sum(r["missed_cases"] for r in rows))
        out["false_positive_cases"] = float(sum(r["false_positive_cases"] for r in rows))
        out["loss"] = self.loss_sum / self.count if self.count else math.nan
        return out

    def summary(self, confidence: float, threshold: float) -> dict[str, MetricWithCI]:
        """Per-case means with normal intervals (``mean +/- z sd / sqrt(n)``), global Dice and
        IoU, HD95 summaries; averaged over the foreground classes, with intervals when there
        is one foreground class. Each voxel takes its arg-max class: ``threshold`` is unused."""
        nan = math.nan
        z = ev.z_value(1.0 - confidence)
        a = self.arrays
        rows = self.per_class()
        single = len(rows) == 1
        out: dict[str, MetricWithCI] = {}

        def mean_ci(name: str, total: str, squares: str, count: str) -> None:
            n = int(a[count].sum())
            value = mean_of_finite([r[name] for r in rows])
            low = high = nan
            method = "normal (mean of cases)" if single else "point estimate (mean of classes)"
            if single and a[count][0] >= 2:
                sd = _std(a[total][0], a[squares][0], a[count][0])
                half = z * sd / math.sqrt(a[count][0])
                low, high = value - half, value + half
            out[name] = MetricWithCI(name, value, low, high, method, n)

        mean_ci("dice_case_mean", "dice_sum", "dice_sumsq", "dice_count")
        cases = int(a["dice_count"].sum())
        for name in ("dice", "iou", "dice_case_median", "iou_case_mean"):
            value = mean_of_finite([r[name] for r in rows])
            out[name] = MetricWithCI(name, value, nan, nan, "point estimate", cases)
        mean_ci("hd95_mean", "hd_sum", "hd_sumsq", "hd_count")
        out["hd95_median"] = MetricWithCI(
            "hd95_median",
            mean_of_finite([r["hd95_median"] for r in rows]),
            nan,
            nan,
            "point estimate",
            int(a["hd_count"].sum()),
        )
        missed = int(a["missed"].sum())
        detected, low, high = (
            ev.wilson_ci(cases - missed, cases, 1.0 - confidence) if cases else (nan, nan, nan)
        )
        out["case_detection_rate"] = MetricWithCI(
            "case_detection_rate", detected, low, high, "Wilson", cases
        )
        return out


def _unit_bins(values: np.ndarray, num_bins: int) -> np.ndarray:
    return np.clip((values * num_bins).astype(np.int64), 0, num_bins - 1)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else math.nan


def _std(total: float, squares: float, n: float) -> float:
    if n < 2:
        return math.nan
    variance = (squares - total * total / n) / (n - 1)
    return math.sqrt(max(variance, 0.0))


def _median(histogram: np.ndarray, width: float) -> float:
    """The median from a histogram: the centre of the bin holding the middle case."""
    n = histogram.sum()
    if n == 0:
        return math.nan
    index = int(np.searchsorted(np.cumsum(histogram), n / 2.0))
    return (index + 0.5) * width
