import pytest
import torch

from common.config import ClientConfig, default_run_config, from_run_config
from common.errors import RegistryError
from common.tasks import get_task, list_tasks


def _config(**overrides):
    return from_run_config(ClientConfig, {**default_run_config(), **overrides}).model_config


def test_unknown_task_raises_with_known_names():
    with pytest.raises(RegistryError, match="classification"):
        get_task(_config(task="segmentatoin"))


def test_classification_is_registered():
    assert "classification" in list_tasks()


def test_class_weights_balance_the_classes():
    task = get_task(_config())
    labels = torch.tensor([0, 0, 0, 1])
    weights = task.sample_weights(labels)
    # Each class carries the same total weight.
    assert weights[labels == 0].sum() == pytest.approx(weights[labels == 1].sum())


def test_steps_run_and_states_fill():
    task = get_task(_config(model="small-cnn", **{"image-size": 32}))
    model = task.build_model()
    batch = {"image": torch.randn(4, 1, 32, 32), "label": torch.tensor([0, 1, 0, 1])}
    loss = task.train_step(model, batch, task.loss_function(batch["label"], balance=True))
    assert loss.ndim == 0 and torch.isfinite(loss)
    states = task.new_states()
    model.eval()
    task.eval_step(model, batch, states)
    assert states.compute()["accuracy"] >= 0.0
    pooled = task.pool([states.to_record(), states.to_record()])
    assert pooled.compute()["loss"] == pytest.approx(states.compute()["loss"])


def test_augmentation_keeps_shape():
    task = get_task(_config(**{"image-size": 32}))
    sample = task.augmentation()({"image": torch.randn(1, 32, 32), "label": torch.tensor(1)})
    assert tuple(sample["image"].shape) == (1, 32, 32)


def test_segmentation_predicts_larger_volumes_with_a_sliding_window(monkeypatch):
    from common.tasks import segmentation as tasks

    task = get_task(_config(task="segmentation", model="unet", **{"image-size": 32}))
    model = task.build_model().eval()
    calls = []
    original = tasks.sliding_window_inference

    def spy(*args, **kwargs):
        calls.append(kwargs["roi_size"])
        return original(*args, **kwargs)

    monkeypatch.setattr(tasks, "sliding_window_inference", spy)
    with torch.no_grad():
        same, _ = task.predict(model, {"image": torch.randn(1, 1, 32, 32), "label": None})
        assert calls == []
        large, _ = task.predict(model, {"image": torch.randn(1, 1, 48, 80), "label": None})
    assert calls == [(32, 32)]
    assert same.shape == (1, 2, 32, 32) and large.shape == (1, 2, 48, 80)
    assert torch.allclose(large.sum(1), torch.ones(1, 48, 80), atol=1e-5)


def test_segmentation_steps_run_and_augmentation_moves_mask_with_image():
    task = get_task(_config(task="segmentation", model="unet", **{"image-size": 32}))
    model = task.build_model()
    label = torch.zeros(2, 1, 32, 32, dtype=torch.long)
    label[:, :, 4:9, 20:26] = 1
    batch = {"image": label.float() + 0.1 * torch.randn(2, 1, 32, 32), "label": label}
    loss = task.train_step(model, batch, task.loss_function(None, balance=False))
    assert loss.ndim == 0 and torch.isfinite(loss)
    augment = task.augmentation()
    augment.set_random_state(seed=3)
    for _ in range(5):
        out = augment({"image": batch["image"][0].clone(), "label": label[0].clone()})
        # The lesion stays where the bright pixels are: the mask moved with the image.
        assert out["image"][out["label"] > 0].mean() > out["image"][out["label"] == 0].mean() + 0.5


def test_segmentation_needs_an_image_size_the_networks_can_halve_four_times():
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="image-size"):
        get_task(_config(task="segmentation", model="unet", **{"image-size": 40}))


def test_detection_task_labels_synthetic_boxes_and_trains_a_step():
    from common.synthetic import make_site, site_profiles

    task = get_task(_config(task="detection", model="retinanet", **{"image-size": 32}))
    profile = site_profiles(1, 16, 0)[0]
    data = make_site(profile, index=0, image_size=32, spatial_dims=2, num_classes=2, seed=0)
    targets = task.synthetic_targets(data)
    assert len(targets) == len(data.boxes)
    for target, boxes in zip(targets, data.boxes, strict=True):
        assert target["boxes"].shape == (len(boxes), 4)
        assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()
        assert (target["labels"] == 0).all()  # one object class: lesion
    samples = [{"image": data.images[i], "label": targets[i]} for i in range(4)]
    batch = task.collate(samples)
    assert batch["image"].shape == (4, 1, 32, 32) and len(batch["label"]) == 4
    model = task.build_model()
    loss = task.train_step(model, batch, task.loss_function(None, balance=False))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    predictions, truth = task.predict(model, batch)
    assert len(predictions) == 4 and truth == batch["label"]
    assert set(predictions[0]) == {"boxes", "labels", "scores"}


@pytest.mark.parametrize("dims", [2, 3])
def test_instance_task_targets_train_and_predict_masks_inside_boxes(dims):
    from common.synthetic import make_site, site_profiles

    task = get_task(
        _config(task="instance", model="retina-unet", **{"image-size": 32, "spatial-dims": dims})
    )
    profile = site_profiles(1, 12, 0)[0]
    data = make_site(profile, index=0, image_size=32, spatial_dims=dims, num_classes=2, seed=0)
    targets = task.synthetic_targets(data)
    for target, boxes, instances in zip(targets, data.boxes, data.instances, strict=True):
        k = len(boxes)
        assert target["masks"].shape == (k, *(32,) * dims) and target["masks"].dtype == torch.bool
        # Each mask is one instance of the map, inside its box, which is the synthetic one.
        assert int(target["masks"].sum()) == int((instances > 0).sum())
        expected = torch.tensor([b[: 2 * dims] for b in boxes], dtype=torch.float32)
        assert torch.equal(target["boxes"], expected.reshape(-1, 2 * dims))
    with_lesions = [i for i, t in enumerate(targets) if len(t["boxes"])][:2]
    without = [i for i, t in enumerate(targets) if not len(t["boxes"])][:1]
    batch = task.collate(
        [{"image": data.images[i], "label": targets[i]} for i in with_lesions + without]
    )
    model = task.build_model()
    loss = task.train_step(model, batch, task.loss_function(None, balance=False))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.segmentation_head[0].weight.grad.abs().sum() > 0  # the mask head learns
    predictions, _ = task.predict(model, batch)
    states = task.new_states()
    states.update(predictions, batch["label"])
    assert states.images == 3 and np_finite(states.compute()["box_ap50"])
    for prediction in predictions:
        masks, boxes = prediction["masks"], prediction["boxes"]
        assert masks.shape == (len(boxes), *(32,) * dims)
        for mask, box in zip(masks, boxes, strict=True):
            outside = mask.clone()
            inside = tuple(
                slice(int(box[d].floor()), int(box[d + dims].ceil())) for d in range(dims)
            )
            outside[inside] = False
            assert not outside.any()


def np_finite(value):
    import math

    return math.isfinite(value)


@pytest.mark.parametrize("task_name", ["detection", "instance"])
def test_box_augmentation_moves_boxes_and_masks_with_the_image(task_name):
    from common.tasks import instance_target

    model = "retinanet" if task_name == "detection" else "retina-unet"
    task = get_task(_config(task=task_name, model=model, **{"image-size": 32}))
    instances = torch.zeros((1, 32, 32), dtype=torch.uint8)
    instances[0, 3:9, 20:30] = 1
    instances[0, 15:18, 2:5] = 2
    target = instance_target(instances, 1)
    if task_name == "detection":
        del target["masks"]
    image = instances.float() * 0.5
    augment = task.augmentation()
    moved_somewhere = False
    for seed in range(12):
        augment.set_random_state(seed=seed)
        out = augment({"image": image.clone(), "label": dict(target)})
        label = out["label"]
        assert set(label) == set(target)
        assert len(label["boxes"]) == 2 and torch.equal(label["labels"], target["labels"])
        # The bright voxels, wherever they went, still fill exactly the moved boxes.
        bright = out["image"][0] > 0.1
        for box in label["boxes"]:
            region = bright[int(box[0]) : int(box[2]), int(box[1]) : int(box[3])]
            assert region.all()
        covered = sum(int((b[2] - b[0]) * (b[3] - b[1])) for b in label["boxes"])
        assert covered == int(bright.sum())
        if task_name == "instance":
            assert torch.equal(label["masks"].any(0), bright)
        moved_somewhere |= not torch.equal(label["boxes"], target["boxes"])
    assert moved_somewhere


def test_detection_anchor_scale_matches_the_synthetic_lesion_scale():
    # common.tasks does not import the synthetic generator; the two constants must agree.
    from common.synthetic import LESION_SCALE
    from common.tasks import DetectionTask

    assert DetectionTask.ANCHOR_SCALE == LESION_SCALE


def test_tasks_do_not_import_the_synthetic_generator():
    import subprocess
    import sys

    code = "import sys, common.tasks; print('common.synthetic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
