"""Pooled detection metrics against MONAI's COCO evaluator on three fake sites' images."""

import numpy as np
import pytest
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou

from common.det_metrics import IOU_THRESHOLDS, DetectionStates


def _images(seed: int, n: int, dims: int):
    """Images with zero, one or several objects; detections jittered, missed and spurious."""
    rng = np.random.default_rng(seed)
    predictions, targets = [], []
    for _ in range(n):
        count = rng.choice([0, 1, 2, 4], p=[0.3, 0.3, 0.25, 0.15])
        start = rng.uniform(0, 50, (count, dims))
        size = rng.uniform(4, 12, (count, dims))
        gt = np.concatenate([start, start + size], 1)
        boxes, scores = [], []
        for box in gt:
            if rng.random() < 0.85:
                moved = box + rng.normal(0, 1.2, 2 * dims)
                low = np.minimum(moved[:dims], moved[dims:] - 1)
                boxes.append(np.concatenate([low, np.maximum(moved[dims:], low + 1)]))
                scores.append(rng.uniform(0.3, 1.0))
        for _ in range(rng.poisson(1.5)):
            s = rng.uniform(0, 55, dims)
            boxes.append(np.concatenate([s, s + rng.uniform(3, 10, dims)]))
            scores.append(rng.uniform(0.0, 0.8))
        predictions.append(
            {
                "boxes": np.asarray(boxes).reshape(-1, 2 * dims),
                "labels": np.zeros(len(boxes), dtype=np.int64),
                "scores": np.asarray(scores),
            }
        )
        targets.append({"boxes": gt.reshape(-1, 2 * dims), "labels": np.zeros(count, np.int64)})
    return predictions, targets


@pytest.mark.parametrize("dims", [2, 3])
def test_pooled_ap_matches_monai_coco_metric_on_the_concatenated_images(dims):
    sites = [_images(seed, n, dims) for seed, n in ((0, 60), (1, 90), (2, 40))]
    pooled = DetectionStates(1)
    for predictions, targets in sites:
        states = DetectionStates(1)
        states.update(predictions, targets)
        pooled.add_record(states.to_record())
    predictions = [p for ps, _ in sites for p in ps]
    targets = [t for _, ts in sites for t in ts]
    coco = COCOMetric(
        classes=["lesion"],
        iou_list=[0.1, 0.5],
        iou_range=[0.5, 0.95, 0.05],
        max_detection=[100],
        verbose=False,
    )
    assert list(np.round(coco.get_iou_thresholds(), 2)) == list(IOU_THRESHOLDS)
    matches = matching_batch(
        iou_fn=box_iou,
        iou_thresholds=coco.get_iou_thresholds(),
        pred_boxes=[p["boxes"] for p in predictions],
        pred_classes=[p["labels"] for p in predictions],
        pred_scores=[p["scores"] for p in predictions],
        gt_boxes=[t["boxes"] for t in targets],
        gt_classes=[t["labels"] for t in targets],
    )
    reference = coco(matches)[0]
    ours = pooled.compute()
    assert ours["ap10"] == pytest.approx(reference["AP_IoU_0.10_MaxDet_100"], abs=0.002)
    assert ours["ap50"] == pytest.approx(reference["AP_IoU_0.50_MaxDet_100"], abs=0.002)
    assert ours["map"] == pytest.approx(reference["mAP_IoU_0.50_0.95_0.05_MaxDet_100"], abs=0.002)
    assert pooled.images == len(targets)

    # FROC: sensitivity at k false positives per image, from the ranked detections directly.
    scores, hits = [], []
    for match in matches:
        if 0 in match:
            scores += list(match[0]["dtScores"])
            hits += list(match[0]["dtMatches"][0])
    order = np.argsort(-np.asarray(scores), kind="stable")
    hit = np.asarray(hits, dtype=bool)[order]
    n_gt = sum(len(t["boxes"]) for t in targets)
    fp_per_image = np.cumsum(~hit) / len(targets)
    sensitivity = np.cumsum(hit) / n_gt
    for rate in (1.0, 2.0):
        expected = sensitivity[fp_per_image <= rate].max()
        assert ours[f"sensitivity_at_{rate:g}_fp"] == pytest.approx(expected, abs=0.01)


def test_images_without_objects_or_detections():
    states = DetectionStates(1)
    empty = {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64)}
    states.update([{**empty, "scores": np.zeros(0)}], [empty])
    assert np.isnan(states.compute()["ap50"]) and states.images == 1
    one = {"boxes": np.array([[2.0, 2.0, 8.0, 8.0]]), "labels": np.zeros(1, np.int64)}
    states.update([{**one, "scores": np.array([0.9])}], [one])
    result = states.compute()
    assert result["ap50"] == pytest.approx(1.0) and result["map"] == pytest.approx(1.0)
    assert result["sensitivity_at_1_fp"] == 1.0
