import math

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from common.evaluation import (
    MetricWithCI,
    auc_from_histogram,
    binary_report,
    calibration_from_histogram,
    choose_threshold,
    delong_ci,
    per_class_one_vs_rest,
    roc_curve_from_histogram,
    threshold_metrics,
    wilson_ci,
)
from common.metrics import ClassificationStates

NUM_BINS = 2000
Z_95 = 1.959963984540054

# (cases, prevalence, positive Beta(a, b), negative Beta(a, b)): three unlike sites.
SITES = (
    (300, 0.5, (3.0, 2.0), (2.0, 3.0)),
    (420, 0.2, (5.0, 2.0), (2.0, 4.0)),
    (250, 0.35, (2.0, 1.5), (1.2, 1.5)),
)


def _site_scores(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    sites = []
    for n, prevalence, pos_ab, neg_ab in SITES:
        target = (rng.random(n) < prevalence).astype(np.int64)
        score = np.where(target == 1, rng.beta(*pos_ab, size=n), rng.beta(*neg_ab, size=n))
        sites.append((score, target))
    return sites


def _pooled_histogram(sites: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Sum per-site ClassificationStates histograms of the positive class, as a server does."""
    records = []
    for score, target in sites:
        states = ClassificationStates(2, num_bins=NUM_BINS)
        states.update(np.stack([1.0 - score, score], axis=1), target)
        records.append(states.to_record())
    return ClassificationStates.pooled(records, 2, num_bins=NUM_BINS).histogram[1]


@pytest.fixture(scope="module")
def pooled():
    sites = _site_scores(seed=0)
    score = np.concatenate([s for s, _ in sites])
    target = np.concatenate([t for _, t in sites])
    histogram = _pooled_histogram(sites)
    # Exactness condition of bin-edge thresholds: no raw score within round-off of an edge.
    scaled = score * NUM_BINS
    assert np.min(np.abs(scaled - np.round(scaled))) > 1e-6
    return histogram[0], histogram[1], score, target


def _count_at_least(values: np.ndarray, threshold: float) -> int:
    return int((values >= threshold).sum())


# ---------------------------------------------------------------------------- AUC, ROC
def test_pooled_auc_matches_sklearn_on_raw_predictions(pooled):
    neg, pos, score, target = pooled
    auc = auc_from_histogram(neg, pos)
    assert abs(auc - skm.roc_auc_score(target, score)) < 0.002
    fpr, tpr, _ = roc_curve_from_histogram(neg, pos)
    assert auc == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-12)
    states = ClassificationStates(2, num_bins=NUM_BINS)
    states.histogram[1] = np.stack([neg, pos])
    states.histogram[0] = np.stack([pos, neg])
    assert auc == pytest.approx(states.compute()["auc"], abs=1e-15)


def test_roc_points_are_points_of_sklearn_roc(pooled):
    neg, pos, score, target = pooled
    fpr, tpr, thresholds = roc_curve_from_histogram(neg, pos)
    assert fpr.shape == tpr.shape == thresholds.shape == (NUM_BINS + 1,)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(thresholds) < 0) and np.all(np.diff(fpr) >= 0)
    sk_fpr, sk_tpr, _ = skm.roc_curve(target, score, drop_intermediate=False)
    assert set(zip(fpr, tpr, strict=True)) <= set(zip(sk_fpr, sk_tpr, strict=True))
    positives, negatives = score[target == 1], score[target == 0]
    for k in (1, 400, 1000, 1001, 1733, NUM_BINS - 1):
        i = NUM_BINS - k
        assert thresholds[i] == k / NUM_BINS
        assert tpr[i] == _count_at_least(positives, k / NUM_BINS) / positives.size
        assert fpr[i] == _count_at_least(negatives, k / NUM_BINS) / negatives.size


def test_empty_class_gives_nan_not_error():
    neg, pos = np.array([0, 0, 0]), np.array([1, 2, 0])
    assert math.isnan(auc_from_histogram(neg, pos))
    fpr, tpr, _ = roc_curve_from_histogram(neg, pos)
    assert np.all(np.isnan(fpr)) and tpr[-1] == 1.0
    assert all(math.isnan(v) for v in delong_ci(neg, pos))


# -------------------------------------------------------------------- threshold metrics
@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.9995, "youden", "target-sensitivity"])
def test_threshold_metrics_equal_sklearn_on_raw_scores(pooled, threshold):
    neg, pos, score, target = pooled
    if isinstance(threshold, str):
        threshold = choose_threshold(neg, pos, threshold)
    got = threshold_metrics(neg, pos, threshold)
    predicted = (score >= threshold).astype(np.int64)
    tn, fp, fn, tp = skm.confusion_matrix(target, predicted, labels=[0, 1]).ravel()
    assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (tp, fp, tn, fn)
    assert got["sensitivity"] == pytest.approx(skm.recall_score(target, predicted), rel=1e-12)
    assert got["specificity"] == pytest.approx(
        skm.recall_score(target, predicted, pos_label=0), rel=1e-12
    )
    assert got["ppv"] == pytest.approx(
        skm.precision_score(target, predicted, zero_division=np.nan), rel=1e-12, nan_ok=True
    )
    assert got["npv"] == pytest.approx(
        skm.precision_score(target, predicted, pos_label=0, zero_division=np.nan),
        rel=1e-12,
        nan_ok=True,
    )
    assert got["f1"] == pytest.approx(skm.f1_score(target, predicted), rel=1e-12)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(target, predicted), rel=1e-12)
    assert got["balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(target, predicted), rel=1e-12
    )


def test_threshold_from_validation_is_exact_on_test_sites(pooled):
    neg, pos, _, _ = pooled
    threshold = choose_threshold(neg, pos, "youden")
    test_sites = _site_scores(seed=1)
    test_histogram = _pooled_histogram(test_sites)
    score = np.concatenate([s for s, _ in test_sites])
    target = np.concatenate([t for _, t in test_sites])
    got = threshold_metrics(test_histogram[0], test_histogram[1], threshold)
    tn, fp, fn, tp = skm.confusion_matrix(target, score >= threshold).ravel()
    assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (tp, fp, tn, fn)


def test_confusion_matches_states_at_their_threshold(pooled):
    sites = _site_scores(seed=0)
    states = ClassificationStates(2, num_bins=NUM_BINS, threshold=0.5)
    for score, target in sites:
        states.update(np.stack([1.0 - score, score], axis=1), target)
    got = threshold_metrics(states.histogram[1, 0], states.histogram[1, 1], 0.5)
    assert np.array_equal(states.confusion, [[got["tn"], got["fp"]], [got["fn"], got["tp"]]])


def _raw_rates_at_edges(score: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, ...]:
    edges = np.arange(NUM_BINS + 1) / NUM_BINS
    positives, negatives = np.sort(score[target == 1]), np.sort(score[target == 0])
    tp = positives.size - np.searchsorted(positives, edges, side="left")
    fp = negatives.size - np.searchsorted(negatives, edges, side="left")
    return edges, tp, fp


def test_youden_threshold_maximises_j_over_all_edges(pooled):
    neg, pos, score, target = pooled
    threshold = choose_threshold(neg, pos, "youden")
    edges, tp, fp = _raw_rates_at_edges(score, target)
    n_pos, n_neg = int((target == 1).sum()), int((target == 0).sum())
    j_scaled = tp * n_neg - fp * n_pos  # J * n_pos * n_neg, exact in integers
    k = round(threshold * NUM_BINS)
    assert edges[k] == threshold
    assert j_scaled[k] == j_scaled.max()
    assert k == np.flatnonzero(j_scaled == j_scaled.max()).max()  # documented tie rule


@pytest.mark.parametrize("target_sensitivity", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_target_sensitivity_is_highest_edge_reaching_it(pooled, target_sensitivity):
    neg, pos, score, target = pooled
    threshold = choose_threshold(neg, pos, "target-sensitivity", target_sensitivity)
    positives = score[target == 1]
    k = round(threshold * NUM_BINS)
    assert _count_at_least(positives, k / NUM_BINS) / positives.size >= target_sensitivity
    if k < NUM_BINS:
        above = _count_at_least(positives, (k + 1) / NUM_BINS) / positives.size
        assert above < target_sensitivity


def test_threshold_ties_pick_highest_edge():
    # Negatives in bin 1, positives in bin 6 of 10: edges 0.2 .. 0.6 all separate perfectly.
    neg = np.zeros(10, dtype=np.int64)
    pos = np.zeros(10, dtype=np.int64)
    neg[1], pos[6] = 3, 2
    assert choose_threshold(neg, pos, "youden") == 0.6
    assert choose_threshold(neg, pos, "target-sensitivity", 1.0) == 0.6


# -------------------------------------------------------------------------- calibration
def test_calibration_matches_raw_scores_and_sklearn(pooled):
    neg, pos, score, target = pooled
    mean_predicted, observed, counts, ece = calibration_from_histogram(neg, pos, num_groups=10)
    # sklearn puts scores on an inner group edge in the lower group, we in the upper one.
    scaled = score * 10
    assert np.min(np.abs(scaled - np.round(scaled))) > 1e-9
    group = np.clip(np.floor(scaled).astype(np.int64), 0, 9)
    assert np.array_equal(counts, np.bincount(group, minlength=10))
    raw_ece = 0.0
    for g in np.flatnonzero(counts):
        in_group = group == g
        raw_ece += (
            in_group.sum() / score.size * abs(target[in_group].mean() - score[in_group].mean())
        )
    assert abs(ece - raw_ece) <= 1 / (2 * NUM_BINS) + 1e-12
    prob_true, prob_pred = calibration_curve(target, score, n_bins=10)
    present = counts > 0
    assert np.allclose(observed[present], prob_true, rtol=1e-12, atol=0)
    assert np.all(np.abs(mean_predicted[present] - prob_pred) <= 1 / (2 * NUM_BINS) + 1e-12)


def test_calibration_hand_case_and_empty_groups():
    # 4 bins, 2 groups: group 0 holds 1 negative at bin 0 (centre 0.125) and 1 positive at
    # bin 1 (0.375): predicted 0.25, observed 0.5; group 1 is empty. ECE = |0.5 - 0.25|.
    mean_predicted, observed, counts, ece = calibration_from_histogram(
        np.array([1, 0, 0, 0]), np.array([0, 1, 0, 0]), num_groups=2
    )
    assert counts.tolist() == [2, 0]
    assert mean_predicted[0] == 0.25 and observed[0] == 0.5
    assert math.isnan(mean_predicted[1]) and math.isnan(observed[1])
    assert ece == 0.25


# ----------------------------------------------------------------------------- DeLong
def _delong_per_patient(positives: np.ndarray, negatives: np.ndarray) -> tuple[float, float]:
    """Classic O(m n) structural components of DeLong et al. (1988)."""
    x, y = positives[:, None], negatives[None, :]
    psi = (x > y).astype(np.float64) + 0.5 * (x == y)
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    variance = v10.var(ddof=1) / positives.size + v01.var(ddof=1) / negatives.size
    return float(psi.mean()), float(variance)


def test_delong_from_bins_equals_per_patient_delong(pooled):
    neg, pos, score, target = pooled
    auc, low, high, se = delong_ci(neg, pos)
    # Round each raw score to its bin, as the states do, so that ties are the same.
    bins = np.clip(np.floor(score * NUM_BINS).astype(np.int64), 0, NUM_BINS - 1)
    expected_auc, expected_variance = _delong_per_patient(bins[target == 1], bins[target == 0])
    assert auc == pytest.approx(expected_auc, rel=1e-12)
    assert se**2 == pytest.approx(expected_variance, rel=1e-9)
    assert low == pytest.approx(auc - Z_95 * se, abs=1e-12)
    assert high == pytest.approx(auc + Z_95 * se, abs=1e-12)


def test_delong_hand_cases():
    # Positives in bins {1, 3}, negatives in {0, 2}: of 4 pairs, 3 are won, AUC = 3/4.
    # V10 (positives) = 1/2, 1; V01 (negatives) = 1, 1/2.
    # S10 = S01 = ((1/2 - 3/4)^2 + (1 - 3/4)^2) / (2 - 1) = 1/8.
    # Var = S10/2 + S01/2 = 1/8.
    auc, low, high, se = delong_ci(np.array([1, 0, 1, 0]), np.array([0, 1, 0, 1]))
    assert auc == 0.75
    assert se == pytest.approx(math.sqrt(1 / 8), rel=1e-15)
    assert low == pytest.approx(0.75 - Z_95 * math.sqrt(1 / 8), abs=1e-12)
    assert high == 1.0  # 0.75 + 0.69 clipped
    # With a tie: positives in bins {1, 2}, negatives in {0, 2}: pairs 1, 0, 1, 1/2,
    # AUC = 5/8. V10 = 1/2, 3/4; V01 = 1, 1/4.
    # S10 = (1/8)^2 * 2 = 1/32; S01 = (3/8)^2 * 2 = 9/32; Var = 1/64 + 9/64 = 5/32.
    auc, _, _, se = delong_ci(np.array([1, 0, 1, 0]), np.array([0, 1, 1, 0]))
    assert auc == 0.625
    assert se**2 == pytest.approx(5 / 32, rel=1e-14)


def test_delong_needs_two_of_each():
    auc, low, high, se = delong_ci(np.array([1, 0, 0]), np.array([0, 1, 1]))
    assert auc == 1.0
    assert all(math.isnan(v) for v in (low, high, se))


# ----------------------------------------------------------------------------- Wilson
def test_wilson_known_value():
    p, low, high = wilson_ci(8, 10)
    n, phat, z2 = 10, 0.8, Z_95**2
    centre = (phat + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_95 / (1 + z2 / n) * math.sqrt(phat * (1 - phat) / n + z2 / (4 * n * n))
    assert p == 0.8
    assert low == pytest.approx(centre - half, abs=1e-12)  # 0.4902
    assert high == pytest.approx(centre + half, abs=1e-12)  # 0.9433
    assert low == pytest.approx(0.4901625, abs=1e-6)


def test_wilson_edges():
    assert all(math.isnan(v) for v in wilson_ci(0, 0))
    p, low, high = wilson_ci(0, 20)
    assert p == 0.0 and low == 0.0 and 0.0 < high < 1.0
    p, low, high = wilson_ci(20, 20)
    assert p == 1.0 and high == 1.0 and 0.0 < low < 1.0


# -------------------------------------------------------------------------- reporting
def test_per_class_one_vs_rest_matches_sklearn():
    rng = np.random.default_rng(3)
    target = rng.integers(0, 3, size=600)
    logits = rng.normal(size=(600, 3)) + 1.5 * np.eye(3)[target]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    states = ClassificationStates(3, num_bins=NUM_BINS)
    states.update(probs, target)
    rows = per_class_one_vs_rest(states.histogram)
    assert [row["class"] for row in rows] == [0, 1, 2]
    for c, row in enumerate(rows):
        assert abs(row["auc"] - skm.roc_auc_score(target == c, probs[:, c])) < 0.002
        assert row["positives"] == (target == c).sum()
        assert row["negatives"] == (target != c).sum()
        assert row["low"] < row["auc"] < row["high"]


def test_binary_report(pooled):
    neg, pos, _, _ = pooled
    threshold = choose_threshold(neg, pos, "youden")
    report = {metric.name: metric for metric in binary_report(neg, pos, threshold)}
    counts = threshold_metrics(neg, pos, threshold)
    tp, fp, tn, fn = (int(counts[key]) for key in ("tp", "fp", "tn", "fn"))
    assert all(isinstance(metric, MetricWithCI) for metric in report.values())
    assert report["auc"].method == "DeLong" and report["auc"].n == tp + fp + tn + fn
    assert report["auc"].value == auc_from_histogram(neg, pos)
    expected_n = {
        "sensitivity": tp + fn,
        "specificity": tn + fp,
        "ppv": tp + fp,
        "npv": tn + fn,
        "accuracy": tp + fp + tn + fn,
    }
    for name, n in expected_n.items():
        assert report[name].method == "Wilson" and report[name].n == n
        assert report[name].value == pytest.approx(counts[name], rel=1e-15)
        assert report[name].low <= report[name].value <= report[name].high
    for name in ("f1", "balanced_accuracy"):
        assert report[name].method == "point estimate"
        assert report[name].value == counts[name]
        assert math.isnan(report[name].low) and math.isnan(report[name].high)


# ----------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda: threshold_metrics(np.ones(10), np.ones(10), 0.33), "threshold"),
        (lambda: threshold_metrics(np.ones(10), np.ones(10), 1.5), "threshold"),
        (lambda: choose_threshold(np.ones(10), np.ones(10), "max"), "method"),  # type: ignore[arg-type]
        (
            lambda: choose_threshold(np.ones(10), np.ones(10), "target-sensitivity", 0.0),
            "target_sensitivity",
        ),
        (lambda: choose_threshold(np.ones(10), np.zeros(10)), "pos"),
        (lambda: auc_from_histogram(np.ones(10), np.ones(9)), "neg and pos"),
        (lambda: auc_from_histogram(-np.ones(10), np.ones(10)), "neg"),
        (lambda: auc_from_histogram(np.ones(10), np.full(10, 0.5)), "pos"),
        (lambda: calibration_from_histogram(np.ones(10), np.ones(10), 3), "num_groups"),
        (lambda: delong_ci(np.ones(10), np.ones(10), alpha=1.0), "alpha"),
        (lambda: wilson_ci(11, 10), "successes"),
        (lambda: per_class_one_vs_rest(np.ones((3, 10))), "histogram"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, names):
    with pytest.raises(ValueError, match=names):
        call()
