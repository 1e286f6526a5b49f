import numpy as np
import pytest
from sklearn import metrics as skm

from common.metrics import ClassificationStates


def _fake_site(rng: np.random.Generator, n: int, num_classes: int, shift: float):
    target = rng.integers(0, num_classes, size=n)
    logits = rng.normal(size=(n, num_classes)) + shift * np.eye(num_classes)[target]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, target


def _three_sites(num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        _fake_site(rng, n, num_classes, shift) for n, shift in ((50, 0.5), (173, 1.5), (96, 3.0))
    ]


def _pooled_from_sites(sites, num_classes: int) -> ClassificationStates:
    records = []
    for probs, target in sites:
        site_states = ClassificationStates(num_classes)
        # Two batches per site: update() must accumulate.
        half = len(target) // 2
        site_states.update(probs[:half], target[:half])
        site_states.update(probs[half:], target[half:])
        records.append(site_states.to_record())
    return ClassificationStates.pooled(records, num_classes)


def test_binary_pooled_states_match_sklearn_on_concatenated_sites():
    sites = _three_sites(2)
    probs = np.concatenate([p for p, _ in sites])
    target = np.concatenate([t for _, t in sites])
    got = _pooled_from_sites(sites, 2).compute()
    predicted = (probs[:, 1] >= 0.5).astype(int)

    assert got["auc"] == pytest.approx(skm.roc_auc_score(target, probs[:, 1]), abs=1e-3)
    assert got["sensitivity"] == pytest.approx(skm.recall_score(target, predicted))
    assert got["specificity"] == pytest.approx(skm.recall_score(target, predicted, pos_label=0))
    assert got["ppv"] == pytest.approx(skm.precision_score(target, predicted))
    assert got["npv"] == pytest.approx(skm.precision_score(target, predicted, pos_label=0))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(target, predicted))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(target, predicted))
    assert got["loss"] == pytest.approx(skm.log_loss(target, probs))


def test_multiclass_pooled_states_match_sklearn_on_concatenated_sites():
    sites = _three_sites(4, seed=1)
    probs = np.concatenate([p for p, _ in sites])
    target = np.concatenate([t for _, t in sites])
    got = _pooled_from_sites(sites, 4).compute()
    predicted = probs.argmax(axis=1)
    cm = skm.confusion_matrix(target, predicted)
    tn = cm.sum() - cm.sum(axis=0) - cm.sum(axis=1) + np.diag(cm)
    fp = cm.sum(axis=0) - np.diag(cm)
    fn = cm.sum(axis=1) - np.diag(cm)

    expected_auc = skm.roc_auc_score(target, probs, multi_class="ovr", average="macro")
    assert got["auc"] == pytest.approx(expected_auc, abs=1e-3)
    assert got["sensitivity"] == pytest.approx(skm.recall_score(target, predicted, average="macro"))
    assert got["ppv"] == pytest.approx(skm.precision_score(target, predicted, average="macro"))
    assert got["specificity"] == pytest.approx(np.mean(tn / (tn + fp)))
    assert got["npv"] == pytest.approx(np.mean(tn / (tn + fn)))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(target, predicted))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(target, predicted))
    assert got["loss"] == pytest.approx(skm.log_loss(target, probs))


def test_hand_checkable_case():
    # Positives score 0.9 and 0.4, negatives 0.2 and 0.6: 3 of 4 pairs ranked right.
    states = ClassificationStates(2, num_bins=10)
    probs = np.array([[0.1, 0.9], [0.6, 0.4], [0.8, 0.2], [0.4, 0.6]])
    states.update(probs, np.array([1, 1, 0, 0]))
    got = states.compute()
    assert got["auc"] == pytest.approx(0.75)
    assert got["sensitivity"] == pytest.approx(0.5)
    assert got["specificity"] == pytest.approx(0.5)
    assert got["accuracy"] == pytest.approx(0.5)


def test_tied_scores_count_half_like_sklearn():
    states = ClassificationStates(2, num_bins=4)
    probs = np.array([[0.5, 0.5]] * 4)
    target = np.array([0, 1, 0, 1])
    states.update(probs, target)
    assert states.compute()["auc"] == pytest.approx(skm.roc_auc_score(target, probs[:, 1]))


def test_auc_is_nan_without_both_classes():
    states = ClassificationStates(2)
    states.update(np.array([[0.2, 0.8]]), np.array([1]))
    assert np.isnan(states.compute()["auc"])


def test_add_record_rejects_wrong_shape_and_non_finite_states():
    good = ClassificationStates(2)
    good.update(np.array([[0.2, 0.8]]), np.array([1]))
    record = good.to_record()
    with pytest.raises(ValueError, match="shape"):
        ClassificationStates(3).add_record(record)
    bad = dict(record)
    bad["state.loss_sum"] = [float("nan")]
    with pytest.raises(ValueError, match="finite"):
        ClassificationStates(2).add_record(bad)
    with pytest.raises(ValueError, match="state.count"):
        ClassificationStates(2).add_record({k: v for k, v in record.items() if k != "state.count"})


def test_update_rejects_out_of_range_targets():
    with pytest.raises(ValueError, match="target"):
        ClassificationStates(2).update(np.array([[0.5, 0.5]]), np.array([2]))
