import math

import pytest
import torch

from client.site import synthetic_site
from client.trainer import LocalTrainer, SampleDataset, learning_rate_at
from common.config import ClientConfig, default_run_config, from_run_config
from common.tasks import get_task


def _config(**overrides):
    values = {
        **default_run_config(),
        "model": "small-cnn",
        "image-size": 32,
        "batch-size": 8,
        "synthetic-samples-per-site": 40,
        "augment": False,
    }
    values.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return from_run_config(ClientConfig, values)


def _trainer(config):
    task = get_task(config.model_config)
    site = synthetic_site(0, 2, config)
    trainer = LocalTrainer.for_site(task, config, site, device=torch.device("cpu"))
    return task, trainer


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_fit_trains_and_reports_samples_not_batches():
    config = _config(local_epochs=2, early_stopping_patience=5)
    task, trainer = _trainer(config)
    model = task.build_model()
    before = _flat(model).clone()
    result = trainer.fit(model)
    assert result.num_examples == len(trainer.train_set) > config.batch_size
    assert result.epochs_run == 2
    assert math.isfinite(result.train_loss)
    assert not torch.equal(before, _flat(model))


def test_training_reduces_training_loss_on_fixed_data():
    config = _config(local_epochs=1, learning_rate=0.003, lr_schedule="constant")
    task, trainer = _trainer(config)
    model = task.build_model()
    first = trainer.fit(model, server_round=1).train_loss
    for r in range(2, 7):
        last = trainer.fit(model, server_round=r).train_loss
    assert last < first


def test_early_stopping_restores_best_epoch():
    # A learning rate this large makes validation loss worse after the first epoch.
    config = _config(
        local_epochs=6, early_stopping_patience=1, learning_rate=5.0, lr_schedule="constant"
    )
    task, trainer = _trainer(config)
    model = task.build_model()
    result = trainer.fit(model)
    assert result.stopped_early and result.epochs_run < 6
    assert trainer.evaluate(model).compute()["loss"] == pytest.approx(result.validation_loss)


def test_proximal_term_keeps_weights_near_global_model():
    config = _config(local_epochs=2, learning_rate=0.01, lr_schedule="constant")
    task, trainer = _trainer(config)
    start = task.build_model()
    global_weights = _flat(start).clone()
    free, prox = task.build_model(), task.build_model()
    trainer.fit(free, proximal_mu=0.0)
    trainer.fit(prox, proximal_mu=100.0)
    assert torch.norm(_flat(prox) - global_weights) < torch.norm(_flat(free) - global_weights)


def test_balanced_sampler_and_augmentation_run():
    config = _config(class_balancing="sampler", augment=True)
    task, trainer = _trainer(config)
    result = trainer.fit(task.build_model())
    assert result.num_examples == len(trainer.train_set)


def test_bf16_autocast_on_cpu_gives_finite_loss():
    config = _config(precision="bf16")
    task, trainer = _trainer(config)
    assert math.isfinite(trainer.fit(task.build_model()).train_loss)


def test_empty_site_is_refused():
    config = _config()
    task = get_task(config.model_config)
    empty = SampleDataset(torch.zeros((0, 1, 32, 32)), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="no training samples"):
        LocalTrainer(task, config, empty, empty)


def test_learning_rate_schedules():
    assert learning_rate_at(1.0, "constant", 3, 5, 0.5) == 1.0
    assert learning_rate_at(1.0, "cosine", 1, 4, 0.0) == pytest.approx(1.0)
    assert learning_rate_at(1.0, "cosine", 4, 4, 1.0) == pytest.approx(0.01)
    midway = learning_rate_at(1.0, "cosine", 3, 4, 0.0)
    assert midway == pytest.approx(0.01 + 0.99 * 0.5)
    # Cyclic restarts every round.
    assert learning_rate_at(1.0, "cyclic", 3, 4, 0.0) == pytest.approx(1.0)


def test_synthetic_site_split_is_deterministic():
    config = _config()
    a, b = synthetic_site(1, 3, config), synthetic_site(1, 3, config)
    assert torch.equal(a.train.images, b.train.images)
    sizes = [len(part) for part in (a.train, a.validation, a.test)]
    assert all(n > 0 for n in sizes)
    assert sizes[0] > sizes[1]


def test_evaluate_cells_pools_like_evaluate_and_suppresses_small_cells_before_sending():
    import pandas as pd

    from common.subgroups import SubgroupSpec

    config = _config(synthetic_samples_per_site=200)
    task, trainer = _trainer(config)
    model = task.build_model()
    validation = trainer.validation_set
    n = len(validation)
    # 3 patients are "O": below k = 4, so that cell must not leave the site; and F, the
    # smallest other cell, is withheld with it, or overall minus F minus M would give O.
    sex = ["O"] * 3 + ["F"] * ((n - 3) // 2) + ["M"] * (n - 3 - (n - 3) // 2)
    attributes = pd.DataFrame({"patient_id": [f"p{i}" for i in range(n)], "sex": sex})
    dataset = SampleDataset(validation.images, validation.labels, attributes)
    spec = SubgroupSpec(("sex", "site"), min_cell_size=4)
    result = trainer.evaluate_cells(model, dataset, spec)

    assert sorted(result.suppressed) == ["sex=F", "sex=O"]
    assert sorted(result.cells) == ["sex=M"]
    assert result.patients == {"sex=M": sex.count("M")}
    overall = trainer.evaluate(model, dataset).to_record()
    # The round's states equal the final evaluation's; the final one adds the trust states.
    final = result.overall.to_record()
    for key in ("state.histogram", "state.confusion", "state.count"):
        assert final[key] == overall[key]
    assert final["state.loss_sum"] == pytest.approx(overall["state.loss_sum"])
    assert sum(final["state.selective"]) == len(dataset)
    assert not any(overall["state.selective"])
    # The cells hold exactly their own samples: M evaluated on its own equals the cell.
    male = [i for i, s in enumerate(sex) if s == "M"]
    alone = trainer.evaluate(model, SampleDataset(validation.images[male], validation.labels[male]))
    cell, expected = result.cells["sex=M"].to_record(), alone.to_record()
    for key in ("state.histogram", "state.confusion", "state.count"):
        assert cell[key] == expected[key]
    assert cell["state.loss_sum"] == pytest.approx(expected["state.loss_sum"])


def test_evaluate_cells_without_attributes_sends_only_the_overall_states():
    from common.subgroups import SubgroupSpec

    config = _config()
    task, trainer = _trainer(config)
    plain = SampleDataset(trainer.validation_set.images, trainer.validation_set.labels)
    result = trainer.evaluate_cells(task.build_model(), plain, SubgroupSpec(("sex",)))
    assert result.cells == {} and result.suppressed == []
    assert result.overall.count == len(plain)


def test_non_finite_steps_are_skipped_and_a_run_of_only_such_steps_fails(monkeypatch):
    config = _config(local_epochs=1)
    task, trainer = _trainer(config)
    model = task.build_model()
    original = task.train_step
    calls = {"n": 0}

    def every_other_nan(model, batch, loss_function):
        calls["n"] += 1
        loss = original(model, batch, loss_function)
        return loss * float("nan") if calls["n"] % 2 else loss

    monkeypatch.setattr(task, "train_step", every_other_nan)
    result = trainer.fit(model)
    assert result.skipped_steps == (calls["n"] + 1) // 2 > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(result.train_loss)

    monkeypatch.setattr(task, "train_step", lambda m, b, f: original(m, b, f) * float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.fit(task.build_model())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_the_bf16_gradient_check_finds_a_non_finite_value_in_any_parameter(bad):
    from client.trainer import _finite_gradients

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 1e30)  # large but finite
    model[1].bias.grad = None  # a parameter without gradient is skipped
    if bad is not None:
        model[1].weight.grad[1, 2] = bad
    assert _finite_gradients(model) is (bad is None)
