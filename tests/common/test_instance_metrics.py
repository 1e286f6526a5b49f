"""Pooled instance segmentation metrics against reference evaluators on three fake sites:
pycocotools' COCO ``segm`` evaluation (2D), MONAI's COCO metric with mask IoU (3D), MONAI's
box COCO metric and MONAI's ``DiceMetric`` per instance."""

import numpy as np
import pytest
import torch
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou
from monai.metrics import DiceMetric

from common.instance_metrics import InstanceStates

SIZE = {2: 40, 3: 20}


def _blob(rng: np.random.Generator, dims: int, centre=None, radius=None) -> np.ndarray:
    grid = np.indices((SIZE[dims],) * dims).astype(float)
    centre = rng.uniform(4, SIZE[dims] - 4, dims) if centre is None else centre
    radius = rng.uniform(2.5, 5) if radius is None else radius
    axes = rng.uniform(0.7, 1.3, dims)
    distance = sum(((grid[d] - centre[d]) / axes[d]) ** 2 for d in range(dims))
    return distance <= radius**2


def _box(mask: np.ndarray) -> np.ndarray:
    where = np.nonzero(mask)
    return np.array([w.min() for w in where] + [w.max() + 1 for w in where], dtype=float)


def _images(seed: int, n: int, dims: int):
    """Images with zero, one or several instances; predictions shifted, grown, shrunk, missed
    and spurious, with random scores."""
    rng = np.random.default_rng(seed)
    predictions, targets = [], []
    for _ in range(n):
        count = rng.choice([0, 1, 2, 4], p=[0.3, 0.3, 0.25, 0.15])
        gt = [_blob(rng, dims) for _ in range(count)]
        gt = [m for m in gt if m.any()]
        masks, scores = [], []
        for mask in gt:
            if rng.random() < 0.85:
                shift = rng.integers(-1, 2, dims) * (rng.random() < 0.7)
                moved = np.roll(mask, tuple(shift), axis=tuple(range(dims)))
                if rng.random() < 0.5:
                    moved = moved | np.roll(moved, 1, axis=0)
                masks.append(moved)
                scores.append(rng.uniform(0.2, 1.0))
        for _ in range(rng.poisson(1.2)):
            masks.append(_blob(rng, dims))
            scores.append(rng.uniform(0.0, 0.8))
        masks = [m for m in masks if m.any()]
        scores = scores[: len(masks)]
        shape = (0, *(SIZE[dims],) * dims)
        predictions.append(
            {
                "masks": np.asarray(masks).reshape(-1, *shape[1:]),
                "boxes": np.asarray([_box(m) for m in masks]).reshape(-1, 2 * dims),
                "labels": np.zeros(len(masks), np.int64),
                "scores": np.asarray(scores, dtype=float),
            }
        )
        targets.append(
            {
                "masks": np.asarray(gt).reshape(-1, *shape[1:]),
                "boxes": np.asarray([_box(m) for m in gt]).reshape(-1, 2 * dims),
                "labels": np.zeros(len(gt), np.int64),
            }
        )
    return predictions, targets


def _pooled(sites) -> InstanceStates:
    pooled = InstanceStates(1)
    for predictions, targets in sites:
        states = InstanceStates(1)
        states.update(predictions, targets)
        pooled.add_record(states.to_record())
    return pooled


def _sites(dims: int):
    sites = [_images(seed, n, dims) for seed, n in ((0, 40), (1, 60), (2, 30))]
    predictions = [p for ps, _ in sites for p in ps]
    targets = [t for _, ts in sites for t in ts]
    return sites, predictions, targets


def _monai_coco(iou_fn, predictions, targets, key: str):
    coco = COCOMetric(
        classes=["lesion"], iou_list=[0.1, 0.5], iou_range=[0.5, 0.95, 0.05], verbose=False
    )
    matches = matching_batch(
        iou_fn=iou_fn,
        iou_thresholds=coco.get_iou_thresholds(),
        pred_boxes=[p[key] for p in predictions],
        pred_classes=[p["labels"] for p in predictions],
        pred_scores=[p["scores"] for p in predictions],
        gt_boxes=[t[key] for t in targets],
        gt_classes=[t["labels"] for t in targets],
    )
    return coco(matches)[0]


def test_mask_ap_matches_pycocotools_segm_evaluation_2d():
    mask_utils = pytest.importorskip("pycocotools.mask")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    sites, predictions, targets = _sites(2)
    ours = _pooled(sites).compute()

    def rle(mask):
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        encoded["counts"] = encoded["counts"].decode()
        return encoded

    images, annotations, detections = [], [], []
    for image_id, (prediction, target) in enumerate(zip(predictions, targets, strict=True)):
        images.append({"id": image_id, "height": SIZE[2], "width": SIZE[2]})
        for mask in target["masks"]:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": rle(mask),
                    "area": float(mask.sum()),
                    "bbox": [0, 0, 1, 1],
                    "iscrowd": 0,
                }
            )
        for mask, score in zip(prediction["masks"], prediction["scores"], strict=True):
            detections.append(
                {"image_id": image_id, "category_id": 1, "segmentation": rle(mask), "score": score}
            )
    truth = COCO()
    truth.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1}]}
    truth.createIndex()
    evaluation = COCOeval(truth, truth.loadRes(detections), iouType="segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert ours["map"] == pytest.approx(evaluation.stats[0], abs=0.002)
    assert ours["ap50"] == pytest.approx(evaluation.stats[1], abs=0.002)


def _reference_mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((len(a), len(b)))
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i, j] = np.logical_and(x, y).sum() / np.logical_or(x, y).sum()
    return out


@pytest.mark.parametrize("dims", [2, 3])
def test_mask_and_box_ap_match_monai_coco_metric(dims):
    sites, predictions, targets = _sites(dims)
    ours = _pooled(sites).compute()
    # Mask IoU through MONAI's matcher: one global index per instance, its IoU looked up.
    offsets_p, offsets_t, masks_p, masks_t = [], [], [], []
    for p, t in zip(predictions, targets, strict=True):
        offsets_p.append(np.arange(len(masks_p), len(masks_p) + len(p["masks"]))[:, None])
        offsets_t.append(np.arange(len(masks_t), len(masks_t) + len(t["masks"]))[:, None])
        masks_p += list(p["masks"])
        masks_t += list(t["masks"])

    def lookup(a, b):
        return _reference_mask_iou(
            [masks_p[int(i)] for i in a[:, 0]], [masks_t[int(j)] for j in b[:, 0]]
        )

    indexed_p = [{**p, "index": i} for p, i in zip(predictions, offsets_p, strict=True)]
    indexed_t = [{**t, "index": i} for t, i in zip(targets, offsets_t, strict=True)]
    masks = _monai_coco(lookup, indexed_p, indexed_t, "index")
    assert ours["ap50"] == pytest.approx(masks["AP_IoU_0.50_MaxDet_100"], abs=0.002)
    assert ours["ap10"] == pytest.approx(masks["AP_IoU_0.10_MaxDet_100"], abs=0.002)
    assert ours["map"] == pytest.approx(masks["mAP_IoU_0.50_0.95_0.05_MaxDet_100"], abs=0.002)
    boxes = _monai_coco(box_iou, predictions, targets, "boxes")
    assert ours["box_ap50"] == pytest.approx(boxes["AP_IoU_0.50_MaxDet_100"], abs=0.002)
    assert ours["box_map"] == pytest.approx(boxes["mAP_IoU_0.50_0.95_0.05_MaxDet_100"], abs=0.002)
    assert 0.1 < ours["ap50"] < 0.95  # the fake predictions are neither perfect nor useless


@pytest.mark.parametrize("dims", [2, 3])
def test_per_instance_dice_matches_monai_dice_metric(dims):
    sites, predictions, targets = _sites(dims)
    pooled = _pooled(sites)
    dice = DiceMetric(include_background=True, reduction="none")
    best = []
    for prediction, target in zip(predictions, targets, strict=True):
        keep = prediction["scores"] >= pooled.score_threshold
        for truth in target["masks"]:
            values = [
                dice(
                    torch.from_numpy(mask[None, None].astype(np.float32)),
                    torch.from_numpy(truth[None, None].astype(np.float32)),
                ).item()
                for mask in prediction["masks"][keep]
            ]
            best.append(max(values, default=0.0))
    result = pooled.compute()
    assert pooled.instances == len(best) > 50
    assert result["instance_dice"] == pytest.approx(np.mean(best), abs=1e-6)
    assert result["instance_dice_sd"] == pytest.approx(np.std(best, ddof=1), abs=1e-6)


def test_images_without_instances_or_predictions():
    states = InstanceStates(1)
    empty = {"masks": np.zeros((0, 8, 8), bool), "boxes": np.zeros((0, 4)), "labels": np.zeros(0)}
    states.update([{**empty, "scores": np.zeros(0)}], [empty])
    result = states.compute()
    assert np.isnan(result["ap50"]) and np.isnan(result["instance_dice"]) and states.images == 1
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 2:6, 2:6] = True
    one = {"masks": mask, "boxes": np.array([[2.0, 2, 6, 6]]), "labels": np.zeros(1)}
    states.update([{**one, "scores": np.array([0.9])}], [one])
    missed = {"masks": mask, "boxes": np.array([[2.0, 2, 6, 6]]), "labels": np.zeros(1)}
    states.update([{**empty, "scores": np.zeros(0)}], [missed])
    result = states.compute()
    assert result["ap50"] == pytest.approx(0.5, abs=0.01)
    assert result["instance_dice"] == pytest.approx(0.5)
    assert result["box_ap50"] == pytest.approx(0.5, abs=0.01)


def test_a_malformed_record_is_refused():
    states = InstanceStates(1)
    record = states.to_record()
    record["state.dice"] = record["state.dice"][:-1]
    with pytest.raises(ValueError, match="dice"):
        InstanceStates(1).add_record(record)
