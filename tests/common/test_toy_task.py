"""A task added without touching any other file: a toy regression task registered here, with
its own summable states and a tiny model, run through the trainer and the report.

If this test needs an edit elsewhere to pass, a task-specific branch has crept back in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from common import models
from common.config import ClientConfig, default_run_config, from_run_config
from common.evaluation import MetricWithCI, z_value
from common.report import TEST, VALIDATION, EvaluationStates, SplitStates, build_report
from common.report_files import write_report
from common.states import MetricInfo, SummableStates
from common.tasks import Task, get_task, register_task, task_class, unregister_task

NAME = "toy-regression"
MODEL = "toy-linear"


class AbsoluteErrorStates(SummableStates):
    """Mean absolute error and RMSE of a scalar prediction: sums that add up across sites."""

    def __init__(self) -> None:
        self.arrays = {"abs_sum": np.zeros(1), "abs_sumsq": np.zeros(1), "sq_sum": np.zeros(1)}
        self.count = 0
        self.loss_sum = 0.0

    def update(self, prediction: Any, target: Any) -> None:
        error = (torch.as_tensor(prediction).float() - torch.as_tensor(target).float()).reshape(-1)
        self.arrays["abs_sum"] += float(error.abs().sum())
        self.arrays["abs_sumsq"] += float((error**2).sum())
        self.arrays["sq_sum"] += float((error**2).sum())
        self.loss_sum += float((error**2).sum())
        self.count += error.numel()

    def compute(self) -> dict[str, float]:
        n = self.count
        return {
            "mae": float(self.arrays["abs_sum"][0] / n) if n else math.nan,
            "rmse": math.sqrt(self.arrays["sq_sum"][0] / n) if n else math.nan,
            "loss": self.loss_sum / n if n else math.nan,
        }

    def summary(self, confidence: float, threshold: float) -> dict[str, MetricWithCI]:
        values = self.compute()
        n = self.count
        mae, low, high = values["mae"], math.nan, math.nan
        if n >= 2:
            total, squares = self.arrays["abs_sum"][0], self.arrays["abs_sumsq"][0]
            sd = math.sqrt(max((squares - total * total / n) / (n - 1), 0.0))
            half = z_value(1 - confidence) * sd / math.sqrt(n)
            low, high = mae - half, mae + half
        return {
            "mae": MetricWithCI("mae", mae, low, high, "normal (mean of cases)", n),
            "rmse": MetricWithCI("rmse", values["rmse"], math.nan, math.nan, "point estimate", n),
        }


class ToyRegressionTask(Task):
    """Predict one number per image (its mean intensity): the smallest task there is."""

    name = NAME
    primary_metric = "mae"
    headline_metrics = ("mae", "rmse")
    metrics: ClassVar[dict[str, MetricInfo]] = {
        "mae": MetricInfo("mae", False),
        "rmse": MetricInfo("rmse", False),
        "loss": MetricInfo("loss", False),
    }
    required_columns = ("value",)
    default_model = MODEL
    threshold_note = "regression: no threshold"

    def output_channels(self) -> int:
        return 1

    def loss_function(self, train_labels: torch.Tensor | None, balance: bool) -> nn.Module:
        return nn.MSELoss()

    def sample_weights(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(labels))

    def train_step(self, model: nn.Module, batch: Any, loss_function: nn.Module) -> torch.Tensor:
        prediction = model(batch["image"]).reshape(-1)
        return loss_function(prediction, batch["label"].float())  # type: ignore[no-any-return]

    @classmethod
    def empty_states(cls, num_classes: int) -> AbsoluteErrorStates:
        return AbsoluteErrorStates()

    def predict(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return model(batch["image"]).reshape(-1).float(), batch["label"].float()


def _tiny_model(*, spatial_dims: int, in_channels: int, out_channels: int, **_: Any) -> nn.Module:
    pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
    return nn.Sequential(pool, nn.Flatten(), nn.Linear(in_channels, out_channels))


@pytest.fixture
def toy_task(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[Task]]:
    # The model registry has no public unregister; the test restores it with monkeypatch.
    monkeypatch.setitem(models._REGISTRY, MODEL, _tiny_model)
    monkeypatch.setitem(models._TASK_OF, MODEL, NAME)
    register_task(ToyRegressionTask)
    try:
        yield ToyRegressionTask
    finally:
        unregister_task(NAME)


def _states(rng: np.random.Generator, n: int, error: float) -> AbsoluteErrorStates:
    states = AbsoluteErrorStates()
    target = torch.as_tensor(rng.random(n))
    states.update(target + torch.as_tensor(rng.normal(0, error, n)), target)
    return states


def test_a_toy_task_runs_through_the_report_without_touching_other_files(toy_task, tmp_path):
    assert task_class(NAME) is toy_task
    rng = np.random.default_rng(0)
    split = SplitStates(2, toy_task)
    pooled = AbsoluteErrorStates()
    for site, error in (("a", 0.1), ("b", 0.3)):
        overall = _states(rng, 60, error)
        female, male = _states(rng, 30, error), _states(rng, 30, 2 * error)
        pooled.merge(overall)
        split.add_site(
            site,
            overall.to_record(),
            {"sex=F": female.to_record(), "sex=M": male.to_record()},
            {"sex=F": 30, "sex=M": 30},
            [],
        )
    states = EvaluationStates(
        {VALIDATION: split, TEST: split},
        [],
        {},
        {"task": NAME},
        {"subgroups": "sex,site", "min_cell_size": 10, "confidence_level": 0.95},
    )
    report = build_report(states)

    assert report.primary == "mae" and report.headline == ("mae", "rmse")
    assert math.isnan(report.threshold) and report.threshold_note == "regression: no threshold"
    overall = report.overall.set_index("metric")
    assert overall.loc["mae", "value"] == pytest.approx(pooled.compute()["mae"])
    assert overall.loc["mae", "low"] < overall.loc["mae", "value"] < overall.loc["mae", "high"]
    assert report.per_class.empty and report.confusion.size == 0 and report.curves == []
    assert "largest_mae_gap" in report.fairness.columns
    assert set(report.subgroups["metric"]) == {"mae", "rmse"}

    written = {p.name for p in write_report(report, tmp_path)}
    assert {"metrics.csv", "subgroups.md", "model_card.md", "states.json"} <= written
    assert "mae" in (tmp_path / "subgroups.md").read_text()
    assert isinstance(pd.read_csv(tmp_path / "sites.csv"), pd.DataFrame)
    again = build_report(EvaluationStates.from_json(states.to_json()))
    pd.testing.assert_frame_equal(again.overall, report.overall)


def test_a_toy_task_trains_with_the_local_trainer(toy_task):
    from client.trainer import LocalTrainer, SampleDataset

    values = {
        **default_run_config(),
        "task": NAME,
        "model": MODEL,
        "image-size": 8,
        "batch-size": 0,  # the toy task's default_batch_size (the base's 8)
        "augment": False,
        "local-epochs": 2,
    }
    config = from_run_config(ClientConfig, values)
    assert config.batch_size == 8
    task = get_task(config.model_config)
    images = torch.rand(24, 1, 8, 8)
    targets = images.mean(dim=(1, 2, 3))
    data = SampleDataset(images, torch.zeros(24, dtype=torch.long), targets=targets)
    trainer = LocalTrainer(task, config, data, data, device=torch.device("cpu"))
    model = task.build_model()
    result = trainer.fit(model)
    assert result.num_examples == 24 and math.isfinite(result.train_loss)
    states = trainer.evaluate(model)
    assert isinstance(states, AbsoluteErrorStates) and states.count == 24
