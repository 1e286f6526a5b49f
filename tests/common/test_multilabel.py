"""The multi-label task: its summable states against scikit-learn, its ``labels`` column, its
loss and pseudo-labels, the synthetic second finding, and its report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from common.multilabel_metrics import MultilabelStates
from common.report import TEST, VALIDATION, EvaluationStates, SplitStates, build_report
from common.synthetic import make_site, site_profiles
from common.tasks import MultilabelTask, get_task
from common.tasks.base import ModelConfig

K = 3


def _fake_site(rng: np.random.Generator, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    target = (rng.random((n, K)) < [0.2, 0.4, 0.6]).astype(int)
    logits = rng.normal(size=(n, K)) + shift * (2 * target - 1)
    return 1 / (1 + np.exp(-logits)), target


def _sites() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [_fake_site(rng, n, shift) for n, shift in ((40, 0.3), (131, 1.0), (77, 2.0))]


def _pooled(sites: list[tuple[np.ndarray, np.ndarray]]) -> MultilabelStates:
    pooled = MultilabelStates(K)
    for probs, target in sites:
        site = MultilabelStates(K)
        half = len(target) // 2  # two batches: update() accumulates
        site.update(probs[:half], target[:half])
        site.update(torch.as_tensor(probs[half:]), torch.as_tensor(target[half:]))
        pooled.add_record(site.to_record())
    return pooled


def test_pooled_states_match_scikit_learn_macro_micro_and_per_finding_on_concatenated_sites():
    sites = _sites()
    probs = np.concatenate([p for p, _ in sites])
    target = np.concatenate([t for _, t in sites])
    states = _pooled(sites)
    got = states.compute()

    assert states.count == len(target)
    assert got["auc"] == pytest.approx(skm.roc_auc_score(target, probs, average="macro"), abs=1e-3)
    assert got["auc_micro"] == pytest.approx(
        skm.roc_auc_score(target, probs, average="micro"), abs=1e-3
    )
    for k in range(K):
        assert got[f"auc/finding-{k + 1}"] == pytest.approx(
            skm.roc_auc_score(target[:, k], probs[:, k]), abs=1e-3
        )
    predicted = (probs >= 0.5).astype(int)
    assert got["sensitivity"] == pytest.approx(skm.recall_score(target.ravel(), predicted.ravel()))
    assert got["specificity"] == pytest.approx(
        skm.recall_score(target.ravel(), predicted.ravel(), pos_label=0)
    )
    bce = torch.nn.functional.binary_cross_entropy(
        torch.as_tensor(probs), torch.as_tensor(target, dtype=torch.float64)
    )
    assert got["loss"] == pytest.approx(float(bce), rel=1e-6)

    summary = states.summary(0.95, 0.5)
    for name in ("auc", "auc_micro", "auc/finding-1", "sensitivity/finding-3"):
        metric = summary[name]
        assert metric.low < metric.value < metric.high, name
    assert summary["auc"].value == pytest.approx(got["auc"])
    # The macro interval is at least as wide as the narrowest finding's (conservative).
    widths = [summary[f"auc/finding-{k + 1}"] for k in range(K)]
    assert summary["auc"].high - summary["auc"].low >= min(m.high - m.low for m in widths) - 1e-9
    rows = states.per_class(0.95)
    assert [r["finding"] for r in rows] == ["finding-1", "finding-2", "finding-3"]
    assert [r["positives"] for r in rows] == target.sum(axis=0).tolist()


def test_a_hand_checkable_case():
    states = MultilabelStates(2)
    # Finding 1 ranks perfectly, finding 2 exactly backwards: macro AUC 0.5.
    states.update(
        np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.3], [0.1, 0.7]]),
        np.array([[1, 1], [0, 0], [1, 1], [0, 0]]),
    )
    got = states.compute()
    assert got["auc/finding-1"] == 1.0 and got["auc/finding-2"] == 0.0
    assert got["auc"] == 0.5
    # Micro: positive pairs 0.9, 0.8, 0.1, 0.3 against negative pairs 0.2, 0.1, 0.8, 0.7:
    # 0.9 beats 4; 0.8 beats 3 and ties 1; 0.1 ties 1; 0.3 beats 2 -> (4 + 3.5 + 0.5 + 2) / 16.
    assert got["auc_micro"] == pytest.approx(10 / 16, abs=1e-3)
    assert states.confusion_at(0.5).tolist() == [[2, 2], [2, 2]]


def test_a_malformed_record_is_refused_by_key():
    states = MultilabelStates(2)
    record = states.to_record()
    record.pop("state.finding-2/histogram")
    with pytest.raises(ValueError, match="finding-2/histogram"):
        MultilabelStates(2).add_record(record)


def test_labels_column_flags_are_parsed_and_bad_values_named():
    assert MultilabelTask.parse_label("0;1", 2) == [0, 1]
    assert MultilabelTask.parse_label(" 1 ; 1 ", 2) == [1, 1]
    with pytest.raises(ValueError, match=r"column labels '0;2': '2' is not a 0/1 flag"):
        MultilabelTask.parse_label("0;2", 2)
    with pytest.raises(ValueError, match=r"holds 3 flag\(s\); the run has 2 finding"):
        MultilabelTask.parse_label("0;1;1", 2)


def _task(num_findings: int = 2) -> MultilabelTask:
    task = get_task(ModelConfig("multilabel", "small-cnn", 2, 16, num_findings, 0))
    assert isinstance(task, MultilabelTask)
    return task


def test_sigmoid_outputs_bce_loss_and_pseudo_labels():
    task = _task()
    model = task.build_model()
    images = torch.randn(4, 1, 16, 16)
    labels = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])
    probs, target = task.predict(model, {"image": images, "label": labels})
    assert probs.shape == (4, 2) and bool(((probs > 0) & (probs < 1)).all())
    loss = task.train_step(
        model, {"image": images, "label": labels}, task.loss_function(None, False)
    )
    assert loss.ndim == 0 and math.isfinite(float(loss.detach()))
    weighted = task.loss_function(torch.tensor([[1, 0], [0, 0], [0, 0], [1, 1]]), True)
    assert weighted.pos_weight.tolist() == [1.0, 3.0]  # negatives / positives per finding

    prediction = torch.tensor([[0.95, 0.02], [0.95, 0.6], [0.01, 0.97]])
    flags, confident = task.pseudo_label(prediction, 0.9)
    assert confident.tolist() == [True, False, True]
    assert flags[confident].tolist() == [[1, 0], [0, 1]]


def test_the_synthetic_generator_plants_a_second_finding_without_changing_the_first():
    profile = site_profiles(2, 60, 0)[1]
    plain = make_site(profile, index=1, image_size=32, spatial_dims=2, num_classes=2, seed=0)
    both = make_site(
        profile, index=1, image_size=32, spatial_dims=2, num_classes=2, seed=0, second_finding=True
    )
    assert plain.findings is None and both.findings is not None
    assert torch.equal(both.findings[:, 0], (plain.labels > 0).long())
    second = both.findings[:, 1].bool()
    assert 0 < int(second.sum()) < len(second)
    changed = (both.images - plain.images).abs().flatten(1).amax(1) > 1e-6
    assert torch.equal(changed, second)  # the second lesion is planted where flagged, only
    assert torch.equal(both.masks, plain.masks)
    # Images with none, either and both findings occur.
    assert len({tuple(row) for row in both.findings.tolist()}) == 4
    assert torch.equal(_task().synthetic_targets(both), both.findings)
    with pytest.raises(Exception, match="num-classes must be 2"):
        _task(3).synthetic_targets(both)


def test_the_report_has_per_finding_rows_with_intervals_and_subgroup_tables_per_finding():
    rng = np.random.default_rng(5)
    split = SplitStates(K, "multilabel")
    for site in ("a", "b"):
        cells = {}
        overall = MultilabelStates(K)
        for cell in ("sex=F", "sex=M"):
            states = MultilabelStates(K)
            states.update(*_fake_site(rng, 60, 1.5))
            overall.merge(states)
            cells[cell] = states.to_record()
        split.add_site(site, overall.to_record(), cells, {"sex=F": 60, "sex=M": 60}, [])
    report = build_report(
        EvaluationStates(
            {VALIDATION: split, TEST: split},
            [],
            {},
            {"task": "multilabel"},
            {"subgroups": "sex,site", "min_cell_size": 10, "confidence_level": 0.95},
        )
    )
    overall = report.overall.set_index("metric")
    assert {"auc", "auc_micro", "auc/finding-1", "auc/finding-3"} <= set(overall.index)
    assert overall.loc["auc/finding-2", "method"] == "DeLong"
    assert report.threshold == 0.5 and report.confusion.sum() == 240 * K
    assert set(report.subgroups["metric"]) >= {"auc/finding-1", "auc/finding-2", "auc/finding-3"}
    female = report.subgroups.query("group == 'F' and metric == 'auc/finding-1'")
    assert len(female) == 1 and math.isfinite(female["gap_to_rest"].iloc[0])
    assert "largest_auc_gap" in report.fairness.columns
    assert len(report.per_class) == K and report.curves[0].label == "pooled (micro)"


def test_a_simulated_multilabel_site_trains_and_evaluates_with_the_local_trainer():
    from client.site import synthetic_site
    from client.trainer import LocalTrainer
    from common.config import ClientConfig, default_run_config, from_run_config

    values = {
        **default_run_config(),
        "task": "multilabel",
        "model": "small-cnn",
        "image-size": 16,
        "synthetic-samples-per-site": 40,
        "local-epochs": 1,
        "batch-size": 8,
        "augment": True,
    }
    config = from_run_config(ClientConfig, values)
    site = synthetic_site(0, 2, config)
    assert site.train[0]["label"].shape == (2,)  # one flag per finding
    task = get_task(config.model_config)
    trainer = LocalTrainer.for_site(task, config, site)
    model = task.build_model()
    result = trainer.fit(model)
    assert result.num_examples == len(site.train) and math.isfinite(result.train_loss)
    states = trainer.evaluate(model)
    assert isinstance(states, MultilabelStates) and states.count == len(site.validation)
