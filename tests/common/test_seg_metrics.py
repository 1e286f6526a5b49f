"""Pooled segmentation metrics against MONAI's on the concatenated cases of three fake sites."""

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU
from monai.networks.utils import one_hot

from common.seg_metrics import SegmentationStates

NUM_CLASSES = 3


def _site(seed: int, n: int, dims: int = 2, size: int = 24):
    """Cases with zero, one or several blobs per class, predictions a noisy copy."""
    rng = np.random.default_rng(seed)
    shape = (n, *(size,) * dims)
    labels = np.zeros(shape, dtype=np.int64)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * dims, indexing="ij"))
    for i in range(n):
        for _ in range(rng.integers(0, 4)):  # 0..3 objects: empty cases included
            centre = rng.uniform(4, size - 4, dims).reshape(dims, *[1] * dims)
            radius = rng.uniform(2, 5)
            labels[i][((grid - centre) ** 2).sum(0) < radius**2] = rng.integers(1, NUM_CLASSES)
    predicted = labels.copy()
    flip = rng.random(shape) < 0.04
    predicted[flip] = rng.integers(0, NUM_CLASSES, flip.sum())
    predicted[rng.random(n) < 0.15] = 0  # some cases missed entirely
    return torch.from_numpy(predicted), torch.from_numpy(labels)


def _pooled_states(sites):
    records = []
    for predicted, labels in sites:
        states = SegmentationStates(NUM_CLASSES)
        probs = one_hot(predicted.unsqueeze(1), NUM_CLASSES).float() * 0.9 + 0.1 / NUM_CLASSES
        states.update(probs, labels.unsqueeze(1))
        records.append(states.to_record())
    pooled = SegmentationStates(NUM_CLASSES)
    for record in records:
        pooled.add_record(record)
    return pooled


@pytest.mark.parametrize("dims", [2, 3])
def test_pooled_states_match_monai_on_the_concatenated_cases(dims):
    sites = [
        _site(seed, n, dims, 24 if dims == 2 else 16) for seed, n in ((0, 30), (1, 45), (2, 20))
    ]
    pooled = _pooled_states(sites)
    predicted = torch.cat([p for p, _ in sites])
    labels = torch.cat([t for _, t in sites])
    y_pred = one_hot(predicted.unsqueeze(1), NUM_CLASSES)
    y = one_hot(labels.unsqueeze(1), NUM_CLASSES)

    per_case_dice = DiceMetric(include_background=False, reduction="none")(y_pred, y)
    per_case_iou = MeanIoU(include_background=False, reduction="none")(y_pred, y)
    has_true = y[:, 1:].flatten(2).any(2)
    has_pred = y_pred[:, 1:].flatten(2).any(2)
    hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
        y_pred, y
    )
    rows = pooled.per_class()
    for c, row in enumerate(rows):
        dice_c = per_case_dice[:, c][has_true[:, c]]
        assert row["dice_case_mean"] == pytest.approx(float(dice_c.mean()), abs=1e-6)
        assert row["dice_case_std"] == pytest.approx(float(dice_c.std(unbiased=True)), abs=1e-6)
        assert abs(row["dice_case_median"] - float(dice_c.median())) <= 0.01 + 1e-9
        iou_c = per_case_iou[:, c][has_true[:, c]]
        assert row["iou_case_mean"] == pytest.approx(float(iou_c.mean()), abs=1e-6)
        both = has_true[:, c] & has_pred[:, c]
        hd_c = hd[:, c][both]
        assert row["hd95_mean"] == pytest.approx(float(hd_c.mean()), abs=1e-5)
        assert abs(row["hd95_median"] - float(hd_c.median())) <= 0.5 + 1e-9
        assert row["missed_cases"] == int((has_true[:, c] & ~has_pred[:, c]).sum())
        assert row["false_positive_cases"] == int((~has_true[:, c] & has_pred[:, c]).sum())
        # Global Dice: all voxels of all cases of all sites together.
        tp = (y_pred[:, c + 1].bool() & y[:, c + 1].bool()).sum().item()
        size = y_pred[:, c + 1].sum().item() + y[:, c + 1].sum().item()
        assert row["dice"] == pytest.approx(2 * tp / size, abs=1e-12)
    summary = pooled.compute()
    assert summary["dice_case_mean"] == pytest.approx(np.mean([r["dice_case_mean"] for r in rows]))
    assert pooled.count == len(labels)


def test_cases_without_objects_and_a_perfect_prediction():
    states = SegmentationStates(2)
    empty = torch.zeros(2, 8, 8, dtype=torch.long)
    states.update_labels(empty, empty)
    row = states.per_class()[0]
    assert np.isnan(row["dice"]) and np.isnan(row["dice_case_mean"]) and row["cases"] == 0
    one = torch.zeros(1, 8, 8, dtype=torch.long)
    one[0, 2:5, 2:5] = 1
    states.update_labels(one, one)
    row = states.per_class()[0]
    assert row["dice"] == 1.0 and row["dice_case_mean"] == 1.0 and row["hd95_mean"] == 0.0
    assert row["cases"] == 1 and states.count == 3


def test_states_reject_wrong_shapes_and_negative_counts():
    states = SegmentationStates(2)
    record = states.to_record()
    with pytest.raises(ValueError, match="expected"):
        SegmentationStates(3).add_record(record)
    record["state.tp"] = [-1.0]
    with pytest.raises(ValueError, match="non-negative"):
        SegmentationStates(2).add_record(record)
