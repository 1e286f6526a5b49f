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

from common import attention as att
from common import calibration as cal
from common import evaluation as ev
from common import selective as sel
from common.errors import ConfigError
from common.intervals import MetricWithCI
from common.states import (
    STATE_PREFIX,
    CurveSet,
    MetricInfo,
    SummableStates,
    TrustSummary,
    arrays_from_record,
    arrays_to_record,
)

__all__ = [
    "CLASSIFICATION_METRICS",
    "STATE_PREFIX",
    "ClassificationStates",
    "MetricInfo",
    "arrays_from_record",
    "arrays_to_record",
]

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
class ClassificationStates(SummableStates):
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
    arrays: dict[str, np.ndarray] = field(init=False, repr=False)
    loss_sum: float = field(init=False, default=0.0)
    count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.num_bins < 2:
            raise ConfigError(f"num_bins must be >= 2, got {self.num_bins}")
        grid = len(cal.TEMPERATURES)
        self.arrays = {
            "histogram": np.zeros((self.num_classes, 2, self.num_bins), dtype=np.int64),
            "confusion": np.zeros((self.num_classes, self.num_classes), dtype=np.int64),
            # The final evaluation's trust states (zero in the per-round evaluation):
            # temperature scaling (common.calibration), selective prediction
            # (common.selective) and attention inside the lesion (common.attention).
            "calibration_nll": np.zeros(grid, dtype=np.float64),
            "calibration_counts": np.zeros((grid, cal.RELIABILITY_BINS), dtype=np.int64),
            "calibration_sums": np.zeros((grid, cal.RELIABILITY_BINS, 2), dtype=np.float64),
            "selective": np.zeros((sel.ENTROPY_BINS, 2, sel.SCORE_BINS), dtype=np.int64),
            "attention": np.zeros(3, dtype=np.float64),
        }

    @property
    def histogram(self) -> np.ndarray:
        """``histogram[c, 1, b]``: cases of class c with score for c in bin b; ``[c, 0, b]``:
        the other cases."""
        return self.arrays["histogram"]

    @property
    def confusion(self) -> np.ndarray:
        """``confusion[t, p]``: cases of true class t predicted as class p."""
        return self.arrays["confusion"]

    # ----------------------------------------------------------------- update
    def update(
        self,
        probs: torch.Tensor | np.ndarray | Mapping[str, torch.Tensor],
        target: torch.Tensor | np.ndarray,
    ) -> None:
        """Add a batch of class probabilities ``(N, C)`` and integer targets ``(N,)``.

        The final evaluation passes a mapping instead (``ClassificationTask.final_predict``):
        ``probs`` and, for the trust states, ``logits`` ``(N, C)``, ``entropy`` ``(N,)``
        (normalised, ``common.selective``) and ``attention`` ``(N,)`` (the share of Grad-CAM
        mass inside the lesion, NaN for a case without a lesion mask)."""
        if isinstance(probs, Mapping):
            self._update_trust(probs, torch.as_tensor(target))
            probs = probs["probs"]
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

    def _update_trust(self, final: Mapping[str, torch.Tensor], target: torch.Tensor) -> None:
        if "logits" in final:
            logits = final["logits"].float()
            self.arrays["calibration_nll"] += cal.nll_by_temperature(logits, target)
            counts, sums = cal.reliability_by_temperature(logits, target)
            self.arrays["calibration_counts"] += counts
            self.arrays["calibration_sums"] += sums
        if "entropy" in final:
            self.arrays["selective"] += sel.selective_histogram(
                final["probs"], target, final["entropy"]
            )
        if "attention" in final:
            share = final["attention"].detach().double().cpu().numpy()
            share = share[np.isfinite(share)]
            self.arrays["attention"] += [share.size, share.sum(), (share**2).sum()]

    # ------------------------------------------------------------- federation
    def check_totals(self) -> None:
        """Raise ``ValueError`` unless every class's histogram and the confusion matrix hold
        exactly ``count`` cases (states a real site computed always do)."""
        per_class = self.histogram.sum(axis=(1, 2))
        if np.any(per_class != self.count) or int(self.confusion.sum()) != self.count:
            raise ValueError(
                f"metric states disagree: count {self.count}, histogram totals "
                f"{sorted(set(per_class.tolist()))}, confusion total {int(self.confusion.sum())}"
            )
        # Trust states are absent (zero) or cover every case; the attention share is a mean
        # of shares in [0, 1] over at most every case.
        reliability = set(self.arrays["calibration_counts"].sum(axis=1).tolist())
        selective = int(self.arrays["selective"].sum())
        cases, shares, squares = self.arrays["attention"]
        if (
            not reliability <= {0, self.count}
            or len(reliability) > 1
            or selective not in (0, self.count)
            or cases > self.count
            or shares > cases
            or squares > shares
        ):
            raise ValueError(
                f"trust states disagree with count {self.count}: reliability totals "
                f"{sorted(reliability)}, selective total {selective}, attention {cases:g} cases"
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
        aucs = np.array(
            [ev.auc_from_histogram(*self.histogram[c]) for c in range(self.num_classes)]
        )
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

    # ----------------------------------------------------------------- report
    def positive_histograms(self) -> tuple[np.ndarray, np.ndarray]:
        """``(neg, pos)`` score histograms of the positive class (class 1; binary tasks)."""
        return self.histogram[1, 0], self.histogram[1, 1]

    def summary(self, confidence: float, threshold: float) -> dict[str, MetricWithCI]:
        """AUC (DeLong), threshold metrics (Wilson) and ECE.

        Binary: at ``threshold`` on the positive class. Multi-class: ``auc`` is the macro
        one-vs-rest mean (point estimate), ``accuracy`` from the arg-max confusion (Wilson).
        """
        alpha = 1.0 - confidence
        nan = math.nan
        n = int(self.count)
        if self.num_classes == 2:
            neg, pos = self.positive_histograms()
            out = {m.name: m for m in ev.binary_report(neg, pos, threshold, alpha)}
            *_, ece = ev.calibration_from_histogram(neg, pos, 10)
            out["ece"] = MetricWithCI("ece", ece, nan, nan, "point estimate", n)
            return out
        rows = ev.per_class_one_vs_rest(self.histogram, alpha)
        aucs = [r["auc"] for r in rows if math.isfinite(r["auc"])]
        correct = int(np.trace(self.confusion))
        accuracy, low, high = ev.wilson_ci(correct, n, alpha)
        macro = float(np.mean(aucs)) if aucs else nan
        return {
            "auc": MetricWithCI("auc", macro, nan, nan, "macro one-vs-rest", n),
            "accuracy": MetricWithCI("accuracy", accuracy, low, high, "Wilson", n),
            "balanced_accuracy": MetricWithCI(
                "balanced_accuracy",
                self.compute()["balanced_accuracy"],
                nan,
                nan,
                "point estimate",
                n,
            ),
        }

    def per_class(self, confidence: float = 0.95) -> list[dict[str, float]]:
        """One-vs-rest AUC with DeLong's interval per class."""
        return ev.per_class_one_vs_rest(self.histogram, 1.0 - confidence)

    def confusion_at(self, threshold: float) -> np.ndarray:
        """Binary: ``[[tn, fp], [fn, tp]]`` at ``threshold``; multi-class: the arg-max one."""
        if self.num_classes != 2:
            return self.confusion.copy()
        counts = ev.threshold_metrics(*self.positive_histograms(), threshold)
        return np.array(
            [[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]], dtype=np.int64
        )

    def positives(self) -> int | None:
        return int(self.histogram[1, 1].sum()) if self.num_classes == 2 else None

    def curves(self, label: str, confidence: float) -> CurveSet | None:
        """Binary only: the ROC curve with the DeLong AUC, and the reliability curve."""
        if self.num_classes != 2 or self.count == 0:
            return None
        neg, pos = self.positive_histograms()
        fpr, tpr, _ = ev.roc_curve_from_histogram(neg, pos)
        auc, low, high, _ = ev.delong_ci(neg, pos, 1.0 - confidence)
        mean_predicted, observed, counts, ece = ev.calibration_from_histogram(neg, pos, 10)
        return CurveSet(
            label,
            fpr,
            tpr,
            MetricWithCI("auc", auc, low, high, "DeLong", int(self.count)),
            mean_predicted,
            observed,
            counts,
            ece,
        )

    # ------------------------------------------------------------------ trust
    def fitted_temperature(self) -> float:
        """The grid temperature of least NLL over these states' cases (1.0 without any)."""
        return cal.best_temperature(self.arrays["calibration_nll"])

    def trust(
        self, label: str, temperature: float, threshold: float, confidence: float
    ) -> TrustSummary | None:
        """Calibration before and after ``temperature``, the selective curve at
        ``threshold`` and attention inside the lesion (``None`` without trust states: a
        per-round record, or states stored by an older RadFL)."""
        counts, sums = self.arrays["calibration_counts"], self.arrays["calibration_sums"]
        selective, attention = self.arrays["selective"], self.arrays["attention"]
        if self.count == 0 or not (counts.any() or selective.any() or attention[0] > 0):
            return None
        before, after = (
            cal.UNIT_INDEX,
            cal.temperature_index(temperature if math.isfinite(temperature) else 1.0),
        )
        return TrustSummary(
            label=label,
            count=int(self.count),
            ece_before=cal.expected_calibration_error(counts[before], sums[before]),
            ece_after=cal.expected_calibration_error(counts[after], sums[after]),
            reliability_before=(
                *cal.reliability_curve(counts[before], sums[before]),
                counts[before],
            ),
            reliability_after=(*cal.reliability_curve(counts[after], sums[after]), counts[after]),
            selective=sel.selective_curve(selective, threshold, self.num_classes == 2),
            attention=att.attention_summary(attention, 1.0 - confidence),
        )


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
