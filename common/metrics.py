"""Classification metrics whose states add up across sites.

A site keeps only summable tensors (torchmetrics' pattern): per-class histograms of predicted
scores for positive and negative cases, a confusion matrix, and the summed loss. The server adds
the states of all sites and calls the same ``compute()``, so every reported number is a pooled
value over all patients, never an average of per-site averages. No per-patient prediction leaves
a site.

AUC comes from the score histograms: pairs of a positive and a negative case that fall into the
same bin count one half, as ties do in the Mann-Whitney statistic, so with ``num_bins`` bins the
pooled AUC differs from scikit-learn's on the pooled predictions by at most the share of such
pairs (below 1e-3 with the default 2000 bins on the score spreads seen here).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from common.errors import ConfigError

STATE_PREFIX = "state."


@dataclass(frozen=True)
class MetricInfo:
    """What a server needs to know about one computed metric."""

    name: str
    higher_is_better: bool


CLASSIFICATION_METRICS: dict[str, MetricInfo] = {
    info.name: info
    for info in (
        MetricInfo("auc", True),
        MetricInfo("sensitivity", True),
        MetricInfo("specificity", True),
        MetricInfo("ppv", True),
        MetricInfo("npv", True),
        MetricInfo("accuracy", True),
        MetricInfo("balanced_accuracy", True),
        MetricInfo("loss", False),
    )
}


@dataclass
class ClassificationStates:
    """Summable states of binary or multi-class classification metrics.

    Parameters
    ----------
    num_classes : int
        Number of classes (2 for binary). For two classes, class 1 is the positive finding
        and threshold metrics are reported for it; for more, they are macro averages.
    num_bins : int
        Number of score bins per class for the ROC/AUC histograms.
    threshold : float
        Operating threshold on the positive-class probability (binary only).
    """

    num_classes: int
    num_bins: int = 2000
    threshold: float = 0.5
    # histogram[c, 1, b]: cases of class c with score for c in bin b; [c, 0, b]: other cases.
    histogram: np.ndarray = field(init=False)
    # confusion[t, p]: cases of true class t predicted as class p.
    confusion: np.ndarray = field(init=False)
    loss_sum: float = field(init=False, default=0.0)
    count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.num_bins < 2:
            raise ConfigError(f"num_bins must be >= 2, got {self.num_bins}")
        self.histogram = np.zeros((self.num_classes, 2, self.num_bins), dtype=np.int64)
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    # ----------------------------------------------------------------- update
    def update(self, probs: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add a batch of class probabilities ``(N, C)`` and integer targets ``(N,)``."""
        p = _to_numpy(probs).astype(np.float64)
        t = _to_numpy(target).astype(np.int64).reshape(-1)
        if p.ndim != 2 or p.shape[1] != self.num_classes or p.shape[0] != t.shape[0]:
            raise ValueError(
                f"probs must have shape (N, {self.num_classes}) matching target (N,), "
                f"got {p.shape} and {t.shape}"
            )
        if t.size and (t.min() < 0 or t.max() >= self.num_classes):
            raise ValueError(
                f"target values must lie in [0, {self.num_classes}), got {t.min()}..{t.max()}"
            )
        bins = np.clip((p * self.num_bins).astype(np.int64), 0, self.num_bins - 1)
        for c in range(self.num_classes):
            is_c = (t == c).astype(np.int64)
            np.add.at(self.histogram[c], (is_c, bins[:, c]), 1)
        if self.num_classes == 2:
            predicted = (p[:, 1] >= self.threshold).astype(np.int64)
        else:
            predicted = p.argmax(axis=1)
        np.add.at(self.confusion, (t, predicted), 1)
        picked = np.clip(p[np.arange(t.size), t], 1e-15, 1.0)
        self.loss_sum += float(-np.log(picked).sum())
        self.count += int(t.size)

    # ------------------------------------------------------------- federation
    def to_record(self) -> dict[str, list[float]]:
        """States as flat lists of numbers (a Flower ``MetricRecord`` holds these)."""
        return {
            f"{STATE_PREFIX}histogram": self.histogram.reshape(-1).astype(float).tolist(),
            f"{STATE_PREFIX}confusion": self.confusion.reshape(-1).astype(float).tolist(),
            f"{STATE_PREFIX}loss_sum": [self.loss_sum],
            f"{STATE_PREFIX}count": [float(self.count)],
        }

    def add_record(self, record: Mapping[str, object]) -> None:
        """Add the states of another site, as written by ``to_record``."""
        try:
            histogram = np.asarray(record[f"{STATE_PREFIX}histogram"], dtype=np.float64)
            confusion = np.asarray(record[f"{STATE_PREFIX}confusion"], dtype=np.float64)
            loss_sum = float(np.asarray(record[f"{STATE_PREFIX}loss_sum"]).reshape(-1)[0])
            count = float(np.asarray(record[f"{STATE_PREFIX}count"]).reshape(-1)[0])
        except KeyError as exc:
            raise ValueError(f"metric states lack key {exc.args[0]!r}") from exc
        if histogram.size != self.histogram.size or confusion.size != self.confusion.size:
            raise ValueError(
                "metric states do not match this metric's shape: "
                f"histogram {histogram.size} vs {self.histogram.size}, "
                f"confusion {confusion.size} vs {self.confusion.size}"
            )
        values = np.concatenate([histogram, confusion, [loss_sum, count]])
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ValueError("metric states must be finite, non-negative counts")
        self.histogram += np.rint(histogram).astype(np.int64).reshape(self.histogram.shape)
        self.confusion += np.rint(confusion).astype(np.int64).reshape(self.confusion.shape)
        self.loss_sum += loss_sum
        self.count += int(round(count))

    def check_totals(self) -> None:
        """Raise ``ValueError`` unless every class's histogram and the confusion matrix hold
        exactly ``count`` cases (states a real site computed always do)."""
        per_class = self.histogram.sum(axis=(1, 2))
        if np.any(per_class != self.count) or int(self.confusion.sum()) != self.count:
            raise ValueError(
                f"metric states disagree: count {self.count}, histogram totals "
                f"{sorted(set(per_class.tolist()))}, confusion total {int(self.confusion.sum())}"
            )

    @classmethod
    def pooled(
        cls, records: Iterable[Mapping[str, object]], num_classes: int, **kwargs: float
    ) -> ClassificationStates:
        """Sum the states of several sites."""
        states = cls(num_classes, **kwargs)  # type: ignore[arg-type]
        for record in records:
            states.add_record(record)
        return states

    # ---------------------------------------------------------------- compute
    def compute(self) -> dict[str, float]:
        """Pooled metrics. Values without any case to define them are NaN."""
        cm = self.confusion.astype(np.float64)
        total = cm.sum()
        tp = np.diag(cm)
        fn = cm.sum(axis=1) - tp
        fp = cm.sum(axis=0) - tp
        tn = total - tp - fn - fp
        recall = _ratio(tp, tp + fn)
        specificity = _ratio(tn, tn + fp)
        ppv = _ratio(tp, tp + fp)
        npv = _ratio(tn, tn + fn)
        aucs = np.array([_auc_from_histogram(self.histogram[c]) for c in range(self.num_classes)])
        if self.num_classes == 2:
            pick = {
                "auc": aucs[1],
                "sensitivity": recall[1],
                "specificity": specificity[1],
                "ppv": ppv[1],
                "npv": npv[1],
            }
        else:
            pick = {
                "auc": _nanmean(aucs),
                "sensitivity": _nanmean(recall),
                "specificity": _nanmean(specificity),
                "ppv": _nanmean(ppv),
                "npv": _nanmean(npv),
            }
        present = cm.sum(axis=1) > 0
        pick["accuracy"] = float(tp.sum() / total) if total else float("nan")
        pick["balanced_accuracy"] = _nanmean(recall[present]) if present.any() else float("nan")
        pick["loss"] = self.loss_sum / self.count if self.count else float("nan")
        return {name: float(value) for name, value in pick.items()}


def _auc_from_histogram(histogram: np.ndarray) -> float:
    """Mann-Whitney AUC from negative (row 0) and positive (row 1) score histograms."""
    negatives, positives = histogram[0].astype(np.float64), histogram[1].astype(np.float64)
    n_neg, n_pos = negatives.sum(), positives.sum()
    if n_neg == 0 or n_pos == 0:
        return float("nan")
    negatives_below = np.cumsum(negatives) - negatives
    wins = (positives * (negatives_below + 0.5 * negatives)).sum()
    return float(wins / (n_pos * n_neg))


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _to_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    return np.asarray(value)


def arrays_to_record(
    arrays: Mapping[str, np.ndarray], count: float, loss_sum: float
) -> dict[str, list[float]]:
    """Named count arrays, the case count and the loss sum as a flat record."""
    record = {
        f"{STATE_PREFIX}{name}": array.reshape(-1).astype(float).tolist()
        for name, array in arrays.items()
    }
    record[f"{STATE_PREFIX}loss_sum"] = [float(loss_sum)]
    record[f"{STATE_PREFIX}count"] = [float(count)]
    return record


def arrays_from_record(
    record: Mapping[str, object], like: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], int, float]:
    """Read arrays shaped as ``like``, the case count and the loss sum from a site's record.

    Raises ``ValueError`` naming the problem: a missing key, a wrong size, a non-finite or
    negative count (a malformed or hostile reply never reaches the sums).
    """
    incoming = {}
    for name, array in like.items():
        key = f"{STATE_PREFIX}{name}"
        if key not in record:
            raise ValueError(f"metric states lack key {key!r}")
        values = np.asarray(record[key], dtype=np.float64)
        if values.size != array.size:
            raise ValueError(f"metric state {key} has {values.size} values, expected {array.size}")
        incoming[name] = values.reshape(array.shape)
    try:
        loss_sum = float(np.asarray(record[f"{STATE_PREFIX}loss_sum"]).reshape(-1)[0])
        count = float(np.asarray(record[f"{STATE_PREFIX}count"]).reshape(-1)[0])
    except KeyError as exc:
        raise ValueError(f"metric states lack key {exc.args[0]!r}") from exc
    everything = np.concatenate([v.reshape(-1) for v in incoming.values()] + [[count]])
    if not np.all(np.isfinite(everything)) or not math.isfinite(loss_sum):
        raise ValueError("metric states must be finite")
    if np.any(everything < 0):
        raise ValueError("metric states must be non-negative")
    return incoming, int(round(count)), loss_sum
