"""The report from segmentation states: per-case Dice with intervals, gaps, files."""

import numpy as np
import pandas as pd
import pytest
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from common.report import TEST, VALIDATION, EvaluationStates, SplitStates, build_report
from common.report_files import write_report
from common.seg_metrics import SegmentationStates


def _cases(rng, n, quality):
    labels = np.zeros((n, 24, 24), dtype=np.int64)
    for i in range(n):
        x, y = rng.integers(5, 19, 2)
        labels[i, x - 3 : x + 3, y - 3 : y + 3] = 1
    predicted = labels.copy()
    for i in range(n):
        shift = rng.integers(0, quality + 1)
        predicted[i] = np.roll(labels[i], shift, axis=0)
    return torch.from_numpy(predicted), torch.from_numpy(labels)


def _record(predicted, labels):
    states = SegmentationStates(2)
    states.update_labels(predicted, labels)
    return states.to_record(), states


def test_segmentation_report_pools_sites_and_finds_the_harder_group(tmp_path):
    rng = np.random.default_rng(0)
    split = SplitStates(2, "segmentation")
    everything, female = [], []
    for site in ("a", "b"):
        easy = _cases(rng, 40, quality=1)
        hard = _cases(rng, 40, quality=4)
        both = (torch.cat([easy[0], hard[0]]), torch.cat([easy[1], hard[1]]))
        overall, _ = _record(*both)
        cells = {"sex=M": _record(*easy)[0], "sex=F": _record(*hard)[0]}
        split.add_site(site, overall, cells, {"sex=M": 40, "sex=F": 40}, [])
        everything.append(both)
        female.append(hard)
    states = EvaluationStates(
        {VALIDATION: split, TEST: split},
        [],
        {},
        {"task": "segmentation"},
        {"subgroups": "sex,site", "min_cell_size": 10, "confidence_level": 0.95},
    )
    report = build_report(states)
    assert report.primary == "dice_case_mean" and np.isnan(report.threshold)

    def monai_dice(pairs):
        predicted = torch.cat([p for p, _ in pairs]).unsqueeze(1)
        labels = torch.cat([t for _, t in pairs]).unsqueeze(1)
        return DiceMetric(include_background=False, reduction="none")(
            one_hot(predicted, 2), one_hot(labels, 2)
        )[:, 0]

    overall = report.overall.set_index("metric").loc["dice_case_mean"]
    expected = monai_dice(everything)
    assert overall["value"] == pytest.approx(float(expected.mean()), abs=1e-6)
    half = 1.959964 * float(expected.std(unbiased=True)) / np.sqrt(len(expected))
    assert overall["high"] - overall["value"] == pytest.approx(half, rel=1e-4)

    rows = report.subgroups[report.subgroups["metric"] == "dice_case_mean"].set_index("group")
    assert rows.loc["F", "value"] == pytest.approx(float(monai_dice(female).mean()), abs=1e-6)
    assert rows.loc["F", "gap_to_rest"] < 0 and rows.loc["F", "gap_high"] < 0
    assert rows.loc["F", "gap_method"] == "normal (independent groups)"
    assert "largest_dice_case_mean_gap" in report.fairness.columns

    written = {p.name for p in write_report(report, tmp_path)}
    assert {"metrics.csv", "subgroups.md", "subgroups.png", "model_card.md"} <= written
    assert not {"roc.png", "calibration.png", "confusion.png"} & written
    assert "dice_case_mean" in (tmp_path / "subgroups.md").read_text()
    assert isinstance(pd.read_csv(tmp_path / "sites.csv"), pd.DataFrame)
