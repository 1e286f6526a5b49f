"""The report from instance segmentation states: mask AP, box AP, per-instance Dice."""

import numpy as np
import pytest

from common.instance_metrics import InstanceStates
from common.report import TEST, VALIDATION, EvaluationStates, SplitStates, build_report
from common.report_files import write_report
from tests.common.test_instance_metrics import _images


def _states(predictions, targets) -> InstanceStates:
    states = InstanceStates(1)
    states.update(predictions, targets)
    return states


def test_instance_report_pools_sites_and_shows_mask_ap_and_instance_dice(tmp_path):
    split = SplitStates(2, "instance")
    everything = InstanceStates(1)
    for seed in (0, 1):
        predictions, targets = _images(seed, 40, 2)
        half = len(targets) // 2
        cells = {
            "sex=M": _states(predictions[:half], targets[:half]).to_record(),
            "sex=F": _states(predictions[half:], targets[half:]).to_record(),
        }
        overall = _states(predictions, targets)
        everything.add_record(overall.to_record())
        split.add_site(f"site-{seed}", overall.to_record(), cells, {"sex=M": 20, "sex=F": 20}, [])
    states = EvaluationStates(
        {VALIDATION: split, TEST: split},
        [],
        {},
        {"task": "instance"},
        {"subgroups": "sex", "min_cell_size": 10, "confidence_level": 0.95},
    )
    report = build_report(states)
    assert report.primary == "ap50"
    assert report.headline == ("ap50", "map", "instance_dice", "box_ap50")
    overall = report.overall.set_index("metric")
    expected = everything.compute()
    for name in ("ap50", "map", "box_ap50", "instance_dice"):
        assert overall.loc[name, "value"] == pytest.approx(expected[name], abs=1e-9)
    dice = overall.loc["instance_dice"]
    half = 1.959964 * expected["instance_dice_sd"] / np.sqrt(everything.instances)
    assert dice["high"] - dice["value"] == pytest.approx(half, rel=1e-4)
    assert dice["method"] == "normal (mean of instances)"
    rows = report.subgroups[report.subgroups["metric"] == "instance_dice"].set_index("group")
    assert set(rows.index) >= {"F", "M"} and np.isfinite(rows.loc["F", "gap_low"])
    written = {p.name for p in write_report(report, tmp_path)}
    assert {"metrics.csv", "subgroups.md", "model_card.md"} <= written
    assert "instance_dice" in (tmp_path / "metrics.csv").read_text()
