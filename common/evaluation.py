"""Federated-exact binary evaluation from summed score histograms.

References
----------
E. R. DeLong, D. M. DeLong and D. L. Clarke-Pearson, "Comparing the areas under two or more
correlated receiver operating characteristic curves: a nonparametric approach", Biometrics
44(3):837-845, 1988.

X. Sun and W. Xu, "Fast implementation of DeLong's algorithm for comparing the areas under
correlated receiver operating characteristic curves", IEEE Signal Processing Letters
21(11):1389-1393, 2014.

Wilson's interval, the normal quantile and :class:`MetricWithCI` live in ``common.intervals``
(shared with every task's states) and are re-exported here.

Every function here reads only a pair of score histograms, the states that
:class:`common.metrics.ClassificationStates` keeps and sites add up: ``neg[b]`` negatives and
``pos[b]`` positives whose score falls in bin ``b`` of ``num_bins`` equal bins over [0, 1]
(bin index ``clip(floor(score * num_bins), 0, num_bins - 1)``). For class ``c`` of the states,
``neg = histogram[c, 0]`` and ``pos = histogram[c, 1]``. No per-patient prediction is needed.

Exactness
---------
* Thresholds are bin edges ``k / num_bins`` and a case is predicted positive when its bin is
  ``>= k``. For ``0 < k < num_bins`` this is exactly "score ``>= k / num_bins``" on the raw
  scores, because every score in a bin is at least the bin's lower edge; the only exceptions
  are scores within a floating-point rounding of the edge, where ``floor(score * num_bins)``
  and ``score >= k / num_bins`` can disagree. ``k = 0`` makes every case positive (exact for
  scores ``>= 0``); ``k = num_bins`` (threshold 1.0) makes none positive, like scikit-learn's
  ``+inf`` threshold, even for raw scores equal to 1.0 (those share the last bin).
  So confusion counts, sensitivity, specificity, PPV, NPV, F1, accuracy and balanced accuracy
  at a bin-edge threshold, and the ROC points, equal those of the pooled raw scores.
* AUC and its DeLong variance treat two scores in the same bin as tied (each pair counts 1/2).
  They are exact for the scores rounded down to their bin, and the AUC differs from the raw
  one by at most half the share of positive-negative pairs sharing a bin.
* Calibration groups are unions of whole bins, so group counts and observed fractions are
  exact; the mean predicted probability of a group uses bin centres and is within
  ``1 / (2 * num_bins)`` of the raw mean (scores in [0, 1]), and so is the ECE.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from common.intervals import MetricWithCI, check_alpha, wilson_ci, z_value

__all__ = [
    "THRESHOLD_METHODS",
    "MetricWithCI",
    "auc_from_histogram",
    "binary_report",
    "calibration_from_histogram",
    "choose_threshold",
    "delong_ci",
    "per_class_one_vs_rest",
    "roc_curve_from_histogram",
    "threshold_metrics",
    "wilson_ci",
    "z_value",
]

ThresholdMethod = Literal["youden", "target-sensitivity"]
THRESHOLD_METHODS: tuple[str, ...] = ("youden", "target-sensitivity")

# A threshold this close to an edge, in bin widths, is taken as that edge (float round-off).
_EDGE_TOLERANCE_BINS = 1e-6


# ------------------------------------------------------------------------------ helpers
def _counts(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a histogram pair and return it as int64 arrays."""
    arrays = []
    for name, value in (("neg", neg), ("pos", pos)):
        array = np.asarray(value, dtype=np.float64)
        if array.ndim != 1 or array.size < 1:
            raise ValueError(f"{name} must be a 1-D array of bin counts, got shape {array.shape}")
        if not np.all(np.isfinite(array)) or np.any(array < 0):
            raise ValueError(f"{name} must hold finite, non-negative counts")
        if np.any(array != np.round(array)):
            raise ValueError(f"{name} must hold whole-number counts")
        arrays.append(array.astype(np.int64))
    if arrays[0].shape != arrays[1].shape:
        raise ValueError(
            f"neg and pos must have the same number of bins, got {arrays[0].size} and "
            f"{arrays[1].size}"
        )
    return arrays[0], arrays[1]


def _above_edges(counts: np.ndarray) -> np.ndarray:
    """``out[k]`` = cases in bins ``>= k``, for ``k = 0 .. num_bins``."""
    return np.concatenate([np.cumsum(counts[::-1])[::-1], [0]]).astype(np.int64)


def _edge_index(threshold: float, num_bins: int) -> int:
    """Bin edge ``k`` with ``k / num_bins == threshold``; raise if it is not an edge."""
    value = float(threshold)
    if not math.isfinite(value) or value < 0.0 or value > 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    scaled = value * num_bins
    k = int(round(scaled))
    if abs(scaled - k) > _EDGE_TOLERANCE_BINS:
        raise ValueError(
            f"threshold must be a bin edge k / {num_bins} for the metrics to be exact, got "
            f"{threshold}; choose it with choose_threshold on histograms with the same bins"
        )
    return k


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


# --------------------------------------------------------------------------------- ROC
def roc_curve_from_histogram(
    neg: np.ndarray, pos: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve at every bin edge.

    Parameters
    ----------
    neg, pos : numpy.ndarray
        Score histograms of negative and positive cases, ``(num_bins,)`` counts.

    Returns
    -------
    fpr, tpr : numpy.ndarray
        ``(num_bins + 1,)`` false and true positive rates, from (0, 0) to (1, 1). A rate with
        no case to define it (no negatives, or no positives) is NaN.
    thresholds : numpy.ndarray
        ``(num_bins + 1,)`` decreasing thresholds ``k / num_bins`` for ``k = num_bins .. 0``;
        a case is positive when its score bin is ``>= k``. The first, 1.0, makes no case
        positive (scikit-learn's ``+inf``). Edges between empty bins repeat a point.
    """
    neg_counts, pos_counts = _counts(neg, pos)
    num_bins = neg_counts.size
    fp = _above_edges(neg_counts)[::-1].astype(np.float64)
    tp = _above_edges(pos_counts)[::-1].astype(np.float64)
    n_neg, n_pos = fp[-1], tp[-1]
    fpr = fp / n_neg if n_neg > 0 else np.full_like(fp, np.nan)
    tpr = tp / n_pos if n_pos > 0 else np.full_like(tp, np.nan)
    thresholds = np.arange(num_bins, -1, -1, dtype=np.float64) / num_bins
    return fpr, tpr, thresholds


def auc_from_histogram(neg: np.ndarray, pos: np.ndarray) -> float:
    """Mann-Whitney AUC with pairs in the same bin counted one half.

    This equals the trapezoid area under :func:`roc_curve_from_histogram`.

    Parameters
    ----------
    neg, pos : numpy.ndarray
        Score histograms of negative and positive cases.

    Returns
    -------
    float
        The AUC, or NaN without both negatives and positives.
    """
    neg_counts, pos_counts = _counts(neg, pos)
    return _auc(neg_counts.astype(np.float64), pos_counts.astype(np.float64))


def _auc(neg: np.ndarray, pos: np.ndarray) -> float:
    n_neg, n_pos = neg.sum(), pos.sum()
    if n_neg == 0 or n_pos == 0:
        return float("nan")
    negatives_below = np.cumsum(neg) - neg
    return float((pos * (negatives_below + 0.5 * neg)).sum() / (n_pos * n_neg))


# --------------------------------------------------------------------------- threshold
def choose_threshold(
    neg: np.ndarray,
    pos: np.ndarray,
    method: ThresholdMethod = "youden",
    target_sensitivity: float = 0.9,
) -> float:
    """Choose an operating threshold on validation histograms.

    Apply the result unchanged (with :func:`threshold_metrics`) to test histograms with the
    same bins.

    Parameters
    ----------
    neg, pos : numpy.ndarray
        Validation score histograms of negative and positive cases.
    method : {"youden", "target-sensitivity"}
        ``"youden"`` maximises Youden's J = sensitivity + specificity - 1;
        ``"target-sensitivity"`` takes the highest threshold whose sensitivity is at least
        ``target_sensitivity``.
    target_sensitivity : float
        Required sensitivity in (0, 1], for ``method="target-sensitivity"``.

    Returns
    -------
    float
        A bin edge ``k / num_bins``.

    Notes
    -----
    Ties: among all edges attaining the optimum, the highest (fewest predicted positives) is
    returned. This covers runs of empty bins, where every edge gives the same validation
    operating point, and distinct points with equal J (compared exactly, in integers:
    ``tp * n_neg - fp * n_pos``). With target sensitivity, the rule itself is "highest".

    Raises
    ------
    ValueError
        If ``method`` is unknown, ``target_sensitivity`` lies outside (0, 1], or the
        histograms lack the positives (both methods) or negatives (Youden) the method needs.
    """
    neg_counts, pos_counts = _counts(neg, pos)
    num_bins = neg_counts.size
    fp = _above_edges(neg_counts)
    tp = _above_edges(pos_counts)
    n_neg, n_pos = int(fp[0]), int(tp[0])
    if method == "youden":
        if n_neg == 0 or n_pos == 0:
            raise ValueError(
                f"method 'youden' needs negatives and positives, got neg={n_neg}, pos={n_pos}"
            )
        # J * n_pos * n_neg in integers, so that equal J compare equal.
        score = tp * n_neg - fp * n_pos
        k = int(np.flatnonzero(score == score.max()).max())
    elif method == "target-sensitivity":
        target = float(target_sensitivity)
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target_sensitivity must lie in (0, 1], got {target_sensitivity}")
        if n_pos == 0:
            raise ValueError("method 'target-sensitivity' needs positives, got pos=0")
        # k = 0 has sensitivity 1, so the set is never empty.
        k = int(np.flatnonzero(tp / n_pos >= target).max())
    else:
        raise ValueError(f"method must be one of {THRESHOLD_METHODS}, got {method!r}")
    return k / num_bins


def threshold_metrics(neg: np.ndarray, pos: np.ndarray, threshold: float) -> dict[str, float]:
    """Confusion counts and rates at a bin-edge threshold.

    A case is predicted positive when its score is ``>= threshold``. Because ``threshold``
    must be a bin edge ``k / num_bins``, the counts equal those of the raw scores thresholded
    at that value (see the module's *Exactness* section for the floating-point and
    ``threshold = 1.0`` caveats).

    Parameters
    ----------
    neg, pos : numpy.ndarray
        Score histograms of negative and positive cases.
    threshold : float
        A bin edge ``k / num_bins`` in [0, 1], e.g. from :func:`choose_threshold`.

    Returns
    -------
    dict of str to float
        ``tp``, ``fp``, ``tn``, ``fn`` (integers) and ``sensitivity``, ``specificity``,
        ``ppv``, ``npv``, ``f1`` = 2 tp / (2 tp + fp + fn), ``accuracy`` and
        ``balanced_accuracy`` (mean of sensitivity and specificity over the classes present,
        as scikit-learn). A rate whose denominator is zero is NaN.

    Raises
    ------
    ValueError
        If ``threshold`` is not a bin edge in [0, 1].
    """
    neg_counts, pos_counts = _counts(neg, pos)
    k = _edge_index(threshold, neg_counts.size)
    tp, fn = int(pos_counts[k:].sum()), int(pos_counts[:k].sum())
    fp, tn = int(neg_counts[k:].sum()), int(neg_counts[:k].sum())
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    defined = [value for value in (sensitivity, specificity) if not math.isnan(value)]
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "balanced_accuracy": sum(defined) / len(defined) if defined else float("nan"),
    }


# ------------------------------------------------------------------------- calibration
def calibration_from_histogram(
    neg: np.ndarray, pos: np.ndarray, num_groups: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Reliability curve and expected calibration error (ECE).

    Parameters
    ----------
    neg, pos : numpy.ndarray
        Score histograms of negative and positive cases; the score is the predicted
        probability of the positive class.
    num_groups : int
        Number of equal-width probability groups over [0, 1]; it must divide ``num_bins``,
        so that each group is a union of whole bins (group ``g`` holds scores in
        ``[g / num_groups, (g + 1) / num_groups)``, the last one also 1.0).

    Returns
    -------
    mean_predicted : numpy.ndarray
        ``(num_groups,)`` mean predicted probability per group, from bin centres weighted by
        counts: within ``1 / (2 * num_bins)`` of the raw mean. NaN for an empty group.
    observed_fraction : numpy.ndarray
        ``(num_groups,)`` fraction of positives per group (exact); NaN for an empty group.
    counts : numpy.ndarray
        ``(num_groups,)`` cases per group.
    ece : float
        ``sum_g (n_g / N) |observed_g - predicted_g|`` over non-empty groups; within
        ``1 / (2 * num_bins)`` of the ECE on raw scores. NaN without cases.

    Notes
    -----
    scikit-learn's ``calibration_curve(strategy="uniform")`` puts a score lying exactly on an
    inner group edge into the lower group, this function into the upper one; otherwise the
    observed fractions agree exactly (its output drops empty groups).

    Raises
    ------
    ValueError
        If ``num_groups`` is not a positive integer dividing ``num_bins``.
    """
    neg_counts, pos_counts = _counts(neg, pos)
    num_bins = neg_counts.size
    if isinstance(num_groups, bool) or not isinstance(num_groups, int | np.integer):
        raise ValueError(f"num_groups must be an integer, got {num_groups!r}")
    if num_groups < 1 or num_bins % num_groups:
        raise ValueError(
            f"num_groups must be a positive divisor of num_bins={num_bins}, got {num_groups}"
        )
    bins_per_group = num_bins // num_groups
    total = (neg_counts + pos_counts).astype(np.float64)
    centres = (np.arange(num_bins, dtype=np.float64) + 0.5) / num_bins
    counts = total.reshape(num_groups, bins_per_group).sum(axis=1)
    positives = pos_counts.astype(np.float64).reshape(num_groups, bins_per_group).sum(axis=1)
    predicted_sum = (total * centres).reshape(num_groups, bins_per_group).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.where(counts > 0, predicted_sum / np.maximum(counts, 1), np.nan)
        observed_fraction = np.where(counts > 0, positives / np.maximum(counts, 1), np.nan)
    n_total = counts.sum()
    if n_total == 0:
        ece = float("nan")
    else:
        present = counts > 0
        gaps = np.abs(observed_fraction[present] - mean_predicted[present])
        ece = float((counts[present] * gaps).sum() / n_total)
    return mean_predicted, observed_fraction, counts.astype(np.int64), ece


# ------------------------------------------------------------------ confidence intervals
def delong_ci(
    neg: np.ndarray, pos: np.ndarray, alpha: float = 0.05
) -> tuple[float, float, float, float]:
    """AUC with DeLong's confidence interval, from the binned states.

    DeLong et al. (1988) write the AUC's variance through structural components:
    ``V10(X_i)`` is the share of negatives a positive ``X_i`` beats and ``V01(Y_j)`` the share
    of positives beating a negative ``Y_j`` (ties one half). With ties within a bin, both
    depend only on the bin, so, with ``m`` positives and ``n`` negatives,

    ``S10 = sum_b pos[b] (V10[b] - AUC)^2 / (m - 1)``,
    ``S01 = sum_b neg[b] (V01[b] - AUC)^2 / (n - 1)``,
    ``Var(AUC) = S10 / m + S01 / n``,

    in O(num_bins) and without per-patient data. This is the binned form of Sun & Xu's
    (2014) midrank computation. The interval is ``AUC +/- z * se``, clipped to [0, 1].

    Parameters
    ----------
    neg, pos : numpy.ndarray
        Score histograms of negative and positive cases.
    alpha : float
        One minus the confidence level (0.05 for a 95 % interval).

    Returns
    -------
    auc, low, high, se : float
        ``se`` (and the bounds) are NaN with fewer than 2 positives or 2 negatives;
        everything is NaN without positives or negatives.
    """
    neg_counts, pos_counts = _counts(neg, pos)
    alpha = check_alpha(alpha)
    negatives, positives = neg_counts.astype(np.float64), pos_counts.astype(np.float64)
    n_neg, n_pos = negatives.sum(), positives.sum()
    auc = _auc(negatives, positives)
    nan = float("nan")
    if n_neg < 2 or n_pos < 2:
        return auc, nan, nan, nan
    negatives_below = np.cumsum(negatives) - negatives
    positives_above = positives[::-1].cumsum()[::-1] - positives
    v10 = (negatives_below + 0.5 * negatives) / n_neg
    v01 = (positives_above + 0.5 * positives) / n_pos
    s10 = float((positives * (v10 - auc) ** 2).sum() / (n_pos - 1))
    s01 = float((negatives * (v01 - auc) ** 2).sum() / (n_neg - 1))
    se = math.sqrt(s10 / n_pos + s01 / n_neg)
    half = z_value(alpha) * se
    return auc, max(0.0, auc - half), min(1.0, auc + half), se


# -------------------------------------------------------------------------- reporting
def per_class_one_vs_rest(histogram: np.ndarray, alpha: float = 0.05) -> list[dict[str, float]]:
    """One-vs-rest AUC with DeLong's interval for every class.

    Parameters
    ----------
    histogram : numpy.ndarray
        ``(num_classes, 2, num_bins)`` states as in ``ClassificationStates.histogram``.
    alpha : float
        One minus the confidence level.

    Returns
    -------
    list of dict
        Per class: ``class``, ``auc``, ``low``, ``high``, ``se`` (DeLong), ``positives``
        and ``negatives``.
    """
    array = np.asarray(histogram)
    if array.ndim != 3 or array.shape[1] != 2:
        raise ValueError(f"histogram must have shape (num_classes, 2, num_bins), got {array.shape}")
    rows: list[dict[str, float]] = []
    for c in range(array.shape[0]):
        auc, low, high, se = delong_ci(array[c, 0], array[c, 1], alpha)
        rows.append(
            {
                "class": c,
                "auc": auc,
                "low": low,
                "high": high,
                "se": se,
                "positives": int(array[c, 1].sum()),
                "negatives": int(array[c, 0].sum()),
            }
        )
    return rows


def binary_report(
    neg: np.ndarray, pos: np.ndarray, threshold: float, alpha: float = 0.05
) -> list[MetricWithCI]:
    """Binary metrics with confidence intervals at a bin-edge threshold.

    Parameters
    ----------
    neg, pos : numpy.ndarray
        Score histograms of negative and positive cases (test data).
    threshold : float
        Operating threshold chosen on validation data, a bin edge ``k / num_bins``.
    alpha : float
        One minus the confidence level.

    Returns
    -------
    list of MetricWithCI
        ``auc`` (DeLong, n = all cases); ``sensitivity`` (n = positives), ``specificity``
        (n = negatives), ``ppv`` (n = predicted positives), ``npv`` (n = predicted
        negatives) and ``accuracy`` (n = all cases), each Wilson; ``f1`` (n = cases that are
        positive or predicted positive, as F1 ignores true negatives) and ``balanced_accuracy``
        (n = all cases) as point estimates without an interval (their bounds are NaN).
    """
    neg_counts, pos_counts = _counts(neg, pos)
    alpha = check_alpha(alpha)
    counts = threshold_metrics(neg_counts, pos_counts, threshold)
    tp, fp, tn, fn = (int(counts[key]) for key in ("tp", "fp", "tn", "fn"))
    total = tp + fp + tn + fn
    auc, low, high, _ = delong_ci(neg_counts, pos_counts, alpha)
    report = [MetricWithCI("auc", auc, low, high, "DeLong", total)]
    for name, successes, n in (
        ("sensitivity", tp, tp + fn),
        ("specificity", tn, tn + fp),
        ("ppv", tp, tp + fp),
        ("npv", tn, tn + fn),
        ("accuracy", tp + tn, total),
    ):
        value, low, high = wilson_ci(successes, n, alpha)
        report.append(MetricWithCI(name, value, low, high, "Wilson", n))
    nan = float("nan")
    report.append(MetricWithCI("f1", counts["f1"], nan, nan, "point estimate", tp + fp + fn))
    report.append(
        MetricWithCI(
            "balanced_accuracy", counts["balanced_accuracy"], nan, nan, "point estimate", total
        )
    )
    return report
