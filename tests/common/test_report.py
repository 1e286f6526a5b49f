"""The report from three fake sites' states against scikit-learn on the pooled predictions."""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from common.evaluation import choose_threshold, delong_ci
from common.metrics import ClassificationStates
from common.report import (
    SUPPRESSED,
    TEST,
    VALIDATION,
    EvaluationStates,
    SplitStates,
    build_report,
    difference_ci,
    positive_histograms,
)
from common.report_files import FILES, write_report
from common.subgroups import SubgroupSpec, cell_name

K = 10
SPEC = SubgroupSpec(("sex", "age", "site"), age_bands=(50,), min_cell_size=K)
# (cases, prevalence); site-2 has only 6 patients aged < 50: that cell is suppressed there.
SITES = {"site-0": (500, 0.4), "site-1": (420, 0.25), "site-2": (300, 0.5)}


def _site_data(name: str, n: int, prevalence: float, rng: np.random.Generator) -> pd.DataFrame:
    target = (rng.random(n) < prevalence).astype(np.int64)
    female = rng.random(n) < 0.5
    age = rng.integers(50, 90, n)
    if name == "site-2":
        age[:6] = 30
    else:
        age[: n // 4] = rng.integers(20, 50, n // 4)
    # Women are harder: positives and negatives overlap more.
    separation = np.where(female, 0.6, 2.0)
    logit = rng.normal(0.0, 1.0, n) + np.where(target == 1, separation / 2, -separation / 2)
    score = 1.0 / (1.0 + np.exp(-logit))
    return pd.DataFrame(
        {
            "patient_id": [f"{name}-{i}" for i in range(n)],
            "sex": np.where(female, "F", "M"),
            "age": age,
            "score": score,
            "target": target,
        }
    )


def _states(frame: pd.DataFrame) -> ClassificationStates:
    states = ClassificationStates(2)
    score = frame["score"].to_numpy()
    states.update(np.stack([1 - score, score], axis=1), frame["target"].to_numpy())
    return states


def _split_states(frames: dict[str, pd.DataFrame]) -> SplitStates:
    """What the server collects: per site, overall and per-cell states, small cells suppressed."""
    split = SplitStates(2)
    for site, frame in frames.items():
        cells, patients, suppressed = {}, {}, []
        for (attribute, value), mask in SPEC.cells(frame).items():
            name = cell_name(attribute, value)
            count = frame.loc[mask, "patient_id"].nunique()
            if SPEC.is_small(count):
                suppressed.append(name)
            else:
                cells[name] = _states(frame[mask]).to_record()
                patients[name] = count
        split.add_site(site, _states(frame).to_record(), cells, patients, suppressed)
    return split


@pytest.fixture(scope="module")
def federation():
    rng = np.random.default_rng(4)
    data = {
        split: {name: _site_data(name, n, p, rng) for name, (n, p) in SITES.items()}
        for split in (VALIDATION, TEST)
    }
    states = EvaluationStates(
        splits={split: _split_states(frames) for split, frames in data.items()},
        external_sites=[],
        site_summary={name: {"test_images": n} for name, (n, _) in SITES.items()},
        run={"run_id": "abc", "model": "resnet18", "task": "classification"},
        settings={
            "threshold_method": "youden",
            "target_sensitivity": 0.9,
            "confidence_level": 0.95,
            "min_cell_size": K,
            "subgroups": "sex,age,site",
        },
    )
    return data, states, build_report(states)


def _pooled(data, split):
    return pd.concat(data[split].values(), ignore_index=True)


def _value(table: pd.DataFrame, metric: str) -> pd.Series:
    return table.set_index("metric").loc[metric]


def test_pooled_auc_matches_sklearn_within_0002(federation):
    data, _, report = federation
    test = _pooled(data, TEST)
    expected = skm.roc_auc_score(test["target"], test["score"])
    assert abs(_value(report.overall, "auc")["value"] - expected) < 0.002


def test_threshold_is_chosen_on_validation_and_metrics_at_it_are_exact(federation):
    data, states, report = federation
    validation = states.splits[VALIDATION].pooled()
    assert report.threshold == choose_threshold(*positive_histograms(validation), "youden")
    # Youden on the validation histograms is at least as good as every raw validation cut.
    val = _pooled(data, VALIDATION)
    fpr, tpr, _ = skm.roc_curve(val["target"], val["score"])
    chosen = (val["score"] >= report.threshold).astype(int)
    j = skm.recall_score(val["target"], chosen) + skm.recall_score(1 - val["target"], 1 - chosen)
    assert j - 1 >= (tpr - fpr).max() - 0.01

    test = _pooled(data, TEST)
    predicted = (test["score"] >= report.threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(test["target"], predicted).ravel()
    assert report.confusion.tolist() == [[tn, fp], [fn, tp]]
    expected = {
        "sensitivity": skm.recall_score(test["target"], predicted),
        "specificity": skm.recall_score(1 - test["target"], 1 - predicted),
        "ppv": skm.precision_score(test["target"], predicted),
        "npv": skm.precision_score(1 - test["target"], 1 - predicted),
        "f1": skm.f1_score(test["target"], predicted),
        "accuracy": skm.accuracy_score(test["target"], predicted),
        "balanced_accuracy": skm.balanced_accuracy_score(test["target"], predicted),
    }
    for metric, value in expected.items():
        assert _value(report.overall, metric)["value"] == pytest.approx(value, abs=1e-12), metric


def test_intervals_state_their_method_and_match_delong_and_wilson(federation):
    _, states, report = federation
    pooled = states.splits[TEST].pooled()
    auc, low, high, _ = delong_ci(*positive_histograms(pooled))
    row = _value(report.overall, "auc")
    assert (row["value"], row["low"], row["high"], row["method"]) == (auc, low, high, "DeLong")
    sensitivity = _value(report.overall, "sensitivity")
    assert sensitivity["method"] == "Wilson"
    assert sensitivity["low"] < sensitivity["value"] < sensitivity["high"]
    assert _value(report.overall, "f1")["method"] == "point estimate"


def test_ece_matches_a_direct_computation(federation):
    data, _, report = federation
    test = _pooled(data, TEST)
    groups = np.minimum((test["score"] * 10).astype(int), 9)
    ece = 0.0
    for g in range(10):
        member = groups == g
        if member.any():
            gap = abs(test["target"][member].mean() - test["score"][member].mean())
            ece += member.sum() * gap / len(test)
    assert _value(report.overall, "ece")["value"] == pytest.approx(ece, abs=1 / 4000)


def test_per_site_table_matches_sklearn_per_site(federation):
    data, _, report = federation
    sites = report.sites.set_index("site")
    for site, frame in data[TEST].items():
        expected = skm.roc_auc_score(frame["target"], frame["score"])
        assert abs(sites.loc[site, "auc"] - expected) < 0.002
        assert sites.loc[site, "n"] == len(frame)


def test_subgroup_values_match_sklearn_on_the_reporting_sites(federation):
    data, _, report = federation
    table = report.subgroups
    test = _pooled(data, TEST)
    female = test[test["sex"] == "F"]
    row = table[(table["group"] == "F") & (table["metric"] == "auc")].iloc[0]
    assert abs(row["value"] - skm.roc_auc_score(female["target"], female["score"])) < 0.002
    assert row["n"] == len(female)
    assert row["patients"] == female["patient_id"].nunique()
    # The harder subgroup's gap to the other sex has an interval that excludes zero.
    assert row["gap_to_rest"] < 0 and row["gap_high"] < 0
    assert row["gap_method"] == "DeLong (independent groups)"
    # Age < 50 is suppressed at site-2 (6 patients) and pooled from the other two sites only.
    young = table[(table["group"] == "<50") & (table["metric"] == "auc")].iloc[0]
    assert young["status"] == "partial" and young["sites_suppressed"] == "site-2"
    rows = test[(test["age"] < 50) & (test["patient_id"].str.startswith(("site-0", "site-1")))]
    assert abs(young["value"] - skm.roc_auc_score(rows["target"], rows["score"])) < 0.002


def test_fairness_summaries(federation):
    _, _, report = federation
    sex = report.fairness.set_index("attribute").loc["sex"]
    values = report.subgroups[report.subgroups["attribute"] == "sex"].pivot_table(
        index="group", columns="metric", values="value"
    )
    auc_gap = abs(values.loc["F", "auc"] - values.loc["M", "auc"])
    assert sex["largest_auc_gap"] == pytest.approx(auc_gap)
    tpr_gap = abs(values.loc["F", "sensitivity"] - values.loc["M", "sensitivity"])
    fpr_gap = abs(values.loc["F", "specificity"] - values.loc["M", "specificity"])
    assert sex["equal_opportunity_difference"] == pytest.approx(tpr_gap)
    assert sex["equalized_odds_difference"] == pytest.approx(max(tpr_gap, fpr_gap))
    ece_gap = abs(values.loc["F", "ece"] - values.loc["M", "ece"])
    assert sex["calibration_gap"] == pytest.approx(ece_gap)


def test_a_cell_suppressed_everywhere_is_shown_as_suppressed_never_as_a_number(tmp_path):
    rng = np.random.default_rng(0)
    frames = {name: _site_data(name, 200, 0.4, rng) for name in ("a", "b")}
    for frame in frames.values():
        frame.loc[:4, "sex"] = "O"  # 5 patients per site: below k everywhere
    split = _split_states(frames)
    assert "sex=O" not in split.cells and split.suppressed["sex=O"] == ["a", "b"]
    states = EvaluationStates(
        {VALIDATION: split, TEST: split},
        [],
        {},
        {},
        {"subgroups": "sex", "min_cell_size": K},
    )
    report = build_report(states)
    rows = report.subgroups[report.subgroups["group"] == "O"]
    assert (rows["status"] == SUPPRESSED).all() and rows["value"].isna().all()
    assert rows["n"].isna().all() and rows["patients"].isna().all()
    write_report(report, tmp_path)
    page = (tmp_path / "subgroups.md").read_text()
    line = next(line for line in page.splitlines() if re.match(r"\|\s*O\s*\|", line))
    assert "suppressed" in line and not any(ch.isdigit() for ch in line.replace(f"< {K}", ""))


def test_difference_ci_for_proportions_is_newcombe():
    from common.evaluation import MetricWithCI, wilson_ci

    a = MetricWithCI("sensitivity", *wilson_ci(40, 50), "Wilson", 50)
    b = MetricWithCI("sensitivity", *wilson_ci(20, 50), "Wilson", 50)
    diff, low, high, method = difference_ci(a, b, 0.05)
    # Newcombe (1998), method 10, for 40/50 vs 20/50: 0.400 (0.2150 to 0.5502) per his Table II
    # layout, recomputed here from the Wilson limits.
    assert method == "Newcombe hybrid score"
    assert diff == pytest.approx(0.4)
    assert low == pytest.approx(0.4 - math.hypot(a.value - a.low, b.high - b.value))
    assert 0.2 < low < 0.25 and 0.53 < high < 0.57


def test_json_round_trip_regenerates_the_same_report(federation, tmp_path):
    _, states, report = federation
    again = build_report(EvaluationStates.from_json(json.loads(json.dumps(states.to_json()))))
    pd.testing.assert_frame_equal(again.overall, report.overall)
    pd.testing.assert_frame_equal(again.subgroups, report.subgroups)
    written = write_report(again, tmp_path)
    assert sorted(p.name for p in written) == sorted(FILES)
    card = (tmp_path / "model_card.md").read_text()
    assert "sex=F" in card and "interval excludes zero" in card


def test_left_out_site_is_excluded_from_pooled_values(federation):
    data, states, _ = federation
    external = EvaluationStates(
        states.splits, ["site-2"], states.site_summary, states.run, states.settings
    )
    report = build_report(external)
    kept = pd.concat([data[TEST]["site-0"], data[TEST]["site-1"]])
    expected = skm.roc_auc_score(kept["target"], kept["score"])
    assert abs(_value(report.overall, "auc")["value"] - expected) < 0.002
    roles = report.sites.set_index("site")["role"]
    assert roles["site-2"].startswith("external") and roles["site-0"] == "training"
    assert not math.isnan(report.sites.set_index("site").loc["site-2", "auc"])


def test_a_gap_of_zero_names_no_pair_and_a_real_gap_names_its_two_groups():
    from common.report import fairness_table

    rows = [
        ("sex", group, metric, value, "")
        for group, values in {"F": (0.7, 0.0, 0.9, 0.1), "M": (0.9, 0.0, 0.8, 0.1)}.items()
        for metric, value in zip(("auc", "sensitivity", "specificity", "ece"), values, strict=True)
    ]
    subgroups = pd.DataFrame(rows, columns=["attribute", "group", "metric", "value", "status"])
    sex = fairness_table(subgroups).set_index("attribute").loc["sex"]
    assert sex["auc_gap_between"] == "M vs F"
    assert sex["largest_auc_gap"] == pytest.approx(0.2)
    assert sex["equal_opportunity_difference"] == 0.0
    assert sex["tpr_gap_between"] == "equal in every group"
    assert sex["calibration_gap_between"] == "equal in every group"
