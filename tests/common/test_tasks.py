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
