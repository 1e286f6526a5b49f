"""The evaluation report: pooled metrics with intervals, per-site and subgroup tables, fairness.

Everything here reads summed metric states (``common.metrics.ClassificationStates``,
``common.seg_metrics.SegmentationStates``), never a per-patient prediction. The server builds
:class:`EvaluationStates` from the sites' final replies, stores it as JSON in MLflow, and
:func:`build_report` turns it into tables;
``common.report_files`` writes those as CSV, Markdown, plots and a model card. ``radfl report
RUN_ID`` runs the same two steps on the stored JSON, so a regenerated report equals the first.

The operating threshold is chosen on the pooled *validation* states of the final model and
applied unchanged to the test states. Sites left out of training (``leave-out``) are kept out
of every pooled value and reported on their own, as external validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from common import evaluation as ev
from common.det_metrics import DetectionStates
from common.instance_metrics import InstanceStates
from common.metrics import ClassificationStates
from common.seg_metrics import SegmentationStates
from common.splits import TEST, VALIDATION
from common.subgroups import SITE_ATTRIBUTE, parse_cell_name

SPLITS = (VALIDATION, TEST)

#: Metrics of the subgroup table and the per-site table, in display order.
CELL_METRICS = ("auc", "sensitivity", "specificity", "ppv", "npv", "accuracy", "ece")
SUPPRESSED = "suppressed"


# ----------------------------------------------------------------------------- states
@dataclass
class SplitStates:
    """Summed metric states of one split (validation or test) of the final model.

    Attributes
    ----------
    num_classes : int
    task : str
        Which metric states the split holds (``STATE_TYPES``).
    sites : dict of str to states
        Each site's own states over the split.
    cells : dict of str to dict of str to ClassificationStates
        ``cells[cell][site]``: the states a site sent for a subgroup cell (``sex=F``).
    patients : dict of str to dict of str to int
        ``patients[cell][site]``: distinct patients behind those states (each >= k).
    suppressed : dict of str to list of str
        ``suppressed[cell]``: sites that held fewer than k patients in the cell and sent
        nothing for it.
    """

    num_classes: int
    task: str = "classification"
    sites: dict[str, Any] = field(default_factory=dict)
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    patients: dict[str, dict[str, int]] = field(default_factory=dict)
    suppressed: dict[str, list[str]] = field(default_factory=dict)

    def add_site(
        self,
        site: str,
        overall: Mapping[str, Any],
        cells: Mapping[str, Mapping[str, Any]],
        patients: Mapping[str, int],
        suppressed: Iterable[str],
    ) -> None:
        """Add one site's reply: overall states, per-cell states and the suppressed cells."""
        if site in self.sites:
            raise ValueError(f"site {site!r} replied twice")
        self.sites[site] = _states(self.task, self.num_classes, overall)
        for cell, record in cells.items():
            parse_cell_name(cell)
            self.cells.setdefault(cell, {})[site] = _states(self.task, self.num_classes, record)
            self.patients.setdefault(cell, {})[site] = int(patients[cell])
        for cell in suppressed:
            self.suppressed.setdefault(cell, []).append(site)

    def pooled(self, sites: Iterable[str] | None = None) -> Any:
        """States summed over ``sites`` (all sites by default)."""
        chosen = self.sites if sites is None else {s: self.sites[s] for s in sites}
        return _sum(self.task, self.num_classes, chosen.values())

    def pooled_cell(self, cell: str, sites: Iterable[str]) -> tuple[Any, int]:
        """A cell's states and patients summed over those of ``sites`` that sent it."""
        wanted = set(sites)
        sent = {s: v for s, v in self.cells.get(cell, {}).items() if s in wanted}
        patients = sum(self.patients.get(cell, {}).get(s, 0) for s in sent)
        return _sum(self.task, self.num_classes, sent.values()), patients

    def to_json(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "task": self.task,
            "sites": {s: _record(v) for s, v in self.sites.items()},
            "cells": {c: {s: _record(v) for s, v in by.items()} for c, by in self.cells.items()},
            "patients": self.patients,
            "suppressed": self.suppressed,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SplitStates:
        num_classes = int(data["num_classes"])
        task = str(data.get("task", "classification"))
        return cls(
            num_classes,
            task,
            sites={s: _states(task, num_classes, r) for s, r in data["sites"].items()},
            cells={
                c: {s: _states(task, num_classes, r) for s, r in by.items()}
                for c, by in data["cells"].items()
            },
            patients={c: {s: int(n) for s, n in by.items()} for c, by in data["patients"].items()},
            suppressed={c: list(sites) for c, sites in data["suppressed"].items()},
        )


@dataclass
class EvaluationStates:
    """What the final evaluation collected: both splits, and facts about the run.

    Attributes
    ----------
    splits : dict of str to SplitStates
        ``validation`` and ``test`` states of the final model.
    external_sites : list of str
        Sites left out of training; excluded from pooled values, reported on their own.
    site_summary : dict of str to dict
        Per site: images per split and the like, as the site declared them.
    run : dict
        Run facts for the model card (run id, model, strategy, rounds, selected round, ...).
    settings : dict
        ``threshold_method``, ``target_sensitivity``, ``confidence_level``, ``min_cell_size``,
        ``subgroups``.
    cross_site : dict of str to dict of str to float, optional
        ``cross_site[model][data_site]``: validation AUC of each site's local-only model
        (and the federated one) on every site.
    """

    splits: dict[str, SplitStates]
    external_sites: list[str]
    site_summary: dict[str, dict[str, Any]]
    run: dict[str, Any]
    settings: dict[str, Any]
    cross_site: dict[str, dict[str, float]] | None = None

    @property
    def internal_sites(self) -> list[str]:
        return sorted(s for s in self.splits[TEST].sites if s not in self.external_sites)

    def to_json(self) -> dict[str, Any]:
        return {
            "splits": {name: split.to_json() for name, split in self.splits.items()},
            "external_sites": self.external_sites,
            "site_summary": self.site_summary,
            "run": self.run,
            "settings": self.settings,
            "cross_site": self.cross_site,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvaluationStates:
        return cls(
            splits={name: SplitStates.from_json(s) for name, s in data["splits"].items()},
            external_sites=list(data["external_sites"]),
            site_summary=dict(data["site_summary"]),
            run=dict(data["run"]),
            settings=dict(data["settings"]),
            cross_site=data.get("cross_site"),
        )


#: The metric states of each task, by task name; a task whose report is built here adds its own.
STATE_TYPES: dict[str, Callable[[int], Any]] = {
    "classification": ClassificationStates,
    "segmentation": SegmentationStates,
    # Detection counts "no finding" in num-classes, like classification; boxes have the rest.
    "detection": lambda num_classes: DetectionStates(max(num_classes - 1, 1)),
    "instance": lambda num_classes: InstanceStates(max(num_classes - 1, 1)),
}


def _record(states: Any) -> dict[str, list[float]]:
    return states.to_record()  # type: ignore[no-any-return]


def _empty(task: str, num_classes: int) -> Any:
    try:
        return STATE_TYPES[task](num_classes)
    except KeyError:
        raise ValueError(f"no report metric states for task {task!r}") from None


def _states(task: str, num_classes: int, record: Mapping[str, Any]) -> Any:
    states = _empty(task, num_classes)
    states.add_record(record)
    return states


def _sum(task: str, num_classes: int, parts: Iterable[Any]) -> Any:
    total = _empty(task, num_classes)
    for part in parts:
        total.add_record(part.to_record())
    return total


def primary_metric(states: Any) -> str:
    """The metric the subgroup gaps and fairness summaries centre on."""
    if isinstance(states, DetectionStates):
        return "ap50"
    return "dice_case_mean" if isinstance(states, SegmentationStates) else "auc"


# ---------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class CurveSet:
    """ROC and reliability curves of one population, for the plots."""

    label: str
    fpr: np.ndarray
    tpr: np.ndarray
    auc: ev.MetricWithCI
    mean_predicted: np.ndarray
    observed: np.ndarray
    counts: np.ndarray
    ece: float


@dataclass
class Report:
    """Every table and curve of the evaluation report."""

    threshold: float
    threshold_note: str
    alpha: float
    overall: pd.DataFrame
    validation_overall: pd.DataFrame
    sites: pd.DataFrame
    subgroups: pd.DataFrame
    fairness: pd.DataFrame
    confusion: np.ndarray
    curves: list[CurveSet]
    per_class: pd.DataFrame
    states: EvaluationStates
    #: The metric subgroup gaps centre on (``auc``, ``dice_case_mean``) and the ones shown first.
    primary: str = "auc"
    headline: tuple[str, ...] = ("auc", "sensitivity", "specificity", "ece")


def positive_histograms(states: ClassificationStates) -> tuple[np.ndarray, np.ndarray]:
    """``(neg, pos)`` score histograms of the positive class (class 1; binary tasks)."""
    return states.histogram[1, 0], states.histogram[1, 1]


def choose_operating_threshold(
    validation: Any, method: str, target_sensitivity: float
) -> tuple[float, str]:
    """The threshold chosen on pooled validation states, with a note on how.

    Multi-class tasks predict the arg-max class and have no threshold (returns NaN). Without
    the validation positives or negatives the method needs, 0.5 is used and the note says so.
    """
    if isinstance(validation, SegmentationStates):
        return math.nan, "segmentation: each voxel takes its arg-max class, no threshold"
    if isinstance(validation, DetectionStates):
        return math.nan, "detection: every box scoring >= 0.02 counts, ranked by score"
    if validation.num_classes != 2:
        return math.nan, "multi-class: the predicted class is the arg-max, no threshold"
    neg, pos = positive_histograms(validation)
    try:
        threshold = ev.choose_threshold(
            neg,
            pos,
            method=method,  # type: ignore[arg-type]
            target_sensitivity=target_sensitivity,
        )
    except ValueError as exc:
        return 0.5, f"0.5 (fallback: {exc})"
    if method == "target-sensitivity":
        how = f"highest threshold with validation sensitivity >= {target_sensitivity:g}"
    else:
        how = "Youden's J on the pooled validation split"
    return threshold, f"{threshold:.4f} ({how}; applied unchanged to test)"


def metrics_with_ci(states: Any, threshold: float, alpha: float) -> dict[str, ev.MetricWithCI]:
    """AUC (DeLong), threshold metrics (Wilson) and ECE for one population.

    Binary: at ``threshold`` on the positive class. Multi-class: ``auc`` is the macro
    one-vs-rest mean (point estimate), ``accuracy`` from the arg-max confusion (Wilson).
    """
    nan = math.nan
    n = int(states.count)
    if isinstance(states, SegmentationStates):
        return segmentation_metrics_with_ci(states, alpha)
    if isinstance(states, DetectionStates):
        return detection_metrics_with_ci(states, alpha)
    if states.num_classes == 2:
        neg, pos = positive_histograms(states)
        out = {m.name: m for m in ev.binary_report(neg, pos, threshold, alpha)}
        *_, ece = ev.calibration_from_histogram(neg, pos, 10)
        out["ece"] = ev.MetricWithCI("ece", ece, nan, nan, "point estimate", n)
        return out
    rows = ev.per_class_one_vs_rest(states.histogram, alpha)
    aucs = [r["auc"] for r in rows if math.isfinite(r["auc"])]
    correct = int(np.trace(states.confusion))
    accuracy, low, high = ev.wilson_ci(correct, n, alpha)
    macro = float(np.mean(aucs)) if aucs else nan
    return {
        "auc": ev.MetricWithCI("auc", macro, nan, nan, "macro one-vs-rest", n),
        "accuracy": ev.MetricWithCI("accuracy", accuracy, low, high, "Wilson", n),
        "balanced_accuracy": ev.MetricWithCI(
            "balanced_accuracy",
            states.compute()["balanced_accuracy"],
            nan,
            nan,
            "point estimate",
            n,
        ),
    }


def segmentation_metrics_with_ci(
    states: SegmentationStates, alpha: float
) -> dict[str, ev.MetricWithCI]:
    """Per-case means with normal intervals (``mean +/- z sd / sqrt(n)``), global Dice and IoU,
    HD95 summaries; averaged over the foreground classes, intervals with one foreground class."""
    nan = math.nan
    z = ev.z_value(alpha)
    a = states.arrays
    rows = states.per_class()
    single = len(rows) == 1
    out: dict[str, ev.MetricWithCI] = {}

    def mean_ci(name: str, total: str, squares: str, count: str) -> None:
        n = int(a[count].sum())
        value = _mean([r[name] for r in rows])
        low = high = nan
        method = "normal (mean of cases)" if single else "point estimate (mean of classes)"
        if single and a[count][0] >= 2:
            sd = math.sqrt(
                max((a[squares][0] - a[total][0] ** 2 / a[count][0]) / (a[count][0] - 1), 0.0)
            )
            half = z * sd / math.sqrt(a[count][0])
            low, high = value - half, value + half
        out[name] = ev.MetricWithCI(name, value, low, high, method, n)

    mean_ci("dice_case_mean", "dice_sum", "dice_sumsq", "dice_count")
    cases = int(a["dice_count"].sum())
    for name in ("dice", "iou", "dice_case_median", "iou_case_mean"):
        out[name] = ev.MetricWithCI(
            name, _mean([r[name] for r in rows]), nan, nan, "point estimate", cases
        )
    mean_ci("hd95_mean", "hd_sum", "hd_sumsq", "hd_count")
    out["hd95_median"] = ev.MetricWithCI(
        "hd95_median",
        _mean([r["hd95_median"] for r in rows]),
        nan,
        nan,
        "point estimate",
        int(a["hd_count"].sum()),
    )
    missed = int(a["missed"].sum())
    detected, low, high = ev.wilson_ci(cases - missed, cases, alpha) if cases else (nan, nan, nan)
    out["case_detection_rate"] = ev.MetricWithCI(
        "case_detection_rate", detected, low, high, "Wilson", cases
    )
    return out


def detection_metrics_with_ci(states: DetectionStates, alpha: float) -> dict[str, ev.MetricWithCI]:
    """AP, mAP and FROC as point estimates over the images; the sensitivity at 1 and 4 false
    positives per image with Wilson intervals over the ground-truth lesions."""
    nan = math.nan
    values = states.compute()
    images = int(states.images)
    lesions = int(states.arrays["gt"].sum())
    out = {
        name: ev.MetricWithCI(name, values[name], nan, nan, "point estimate", images)
        for name in ("ap50", "map", "ap10", "froc")
    }
    for name in ("sensitivity_at_1_fp", "sensitivity_at_4_fp"):
        value = values[name]
        if math.isfinite(value) and lesions:
            _, low, high = ev.wilson_ci(int(round(value * lesions)), lesions, alpha)
            out[name] = ev.MetricWithCI(name, value, low, high, "Wilson", lesions)
        else:
            out[name] = ev.MetricWithCI(name, value, nan, nan, "point estimate", lesions)
    if isinstance(states, InstanceStates):
        for name in ("box_ap50", "box_map"):
            out[name] = ev.MetricWithCI(name, values[name], nan, nan, "point estimate", images)
        mean, sd, n = values["instance_dice"], values["instance_dice_sd"], states.instances
        half = ev.z_value(alpha) * sd / math.sqrt(n) if n > 1 and math.isfinite(sd) else nan
        out["instance_dice"] = ev.MetricWithCI(
            "instance_dice", mean, mean - half, mean + half, "normal (mean of instances)", n
        )
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def difference_ci(
    a: ev.MetricWithCI, b: ev.MetricWithCI, alpha: float
) -> tuple[float, float, float, str]:
    """``a - b`` with an interval, for estimates from disjoint groups of patients.

    AUC: normal approximation with the DeLong standard errors recovered from each interval
    (``se = half-width / z``, exact when neither interval was clipped at 0 or 1). Proportions:
    Newcombe's hybrid score interval (method 10, 1998) from the two Wilson intervals. Other
    metrics: the difference alone.
    """
    diff = a.value - b.value
    nan = math.nan
    label = "DeLong (independent groups)" if a.method == "DeLong" else "normal (independent groups)"
    if not (math.isfinite(a.value) and math.isfinite(b.value)):
        return nan, nan, nan, "undefined"
    if not all(math.isfinite(v) for v in (a.low, a.high, b.low, b.high)):
        return diff, nan, nan, "point estimate"
    if a.method.startswith(("DeLong", "normal")) and b.method == a.method:
        z = ev.z_value(alpha)
        se_a, se_b = (a.high - a.low) / (2 * z), (b.high - b.low) / (2 * z)
        half = z * math.hypot(se_a, se_b)
        return diff, diff - half, diff + half, label
    if a.method == "Wilson" and b.method == "Wilson":
        low = diff - math.hypot(a.value - a.low, b.high - b.value)
        high = diff + math.hypot(a.high - a.value, b.value - b.low)
        return diff, low, high, "Newcombe hybrid score"
    return diff, nan, nan, "point estimate"


def build_report(states: EvaluationStates) -> Report:
    """All tables of the report from stored states (no data, no model)."""
    settings = states.settings
    alpha = 1.0 - float(settings.get("confidence_level", 0.95))
    internal = states.internal_sites
    validation = states.splits[VALIDATION].pooled(
        [s for s in states.splits[VALIDATION].sites if s not in states.external_sites]
    )
    threshold, note = choose_operating_threshold(
        validation,
        str(settings.get("threshold_method", "youden")),
        float(settings.get("target_sensitivity", 0.9)),
    )
    test = states.splits[TEST]
    pooled_test = test.pooled(internal)
    primary = primary_metric(pooled_test)
    overall = _metric_table(metrics_with_ci(pooled_test, threshold, alpha))
    validation_overall = _metric_table(metrics_with_ci(validation, threshold, alpha))
    subgroups = _subgroup_table(
        test, internal, pooled_test, threshold, alpha, _attributes(settings)
    )
    return Report(
        threshold=threshold,
        threshold_note=note,
        alpha=alpha,
        overall=overall,
        validation_overall=validation_overall,
        sites=_site_table(test, states.external_sites, threshold, alpha),
        subgroups=subgroups,
        fairness=fairness_table(subgroups, primary),
        confusion=_confusion(pooled_test, threshold),
        curves=_curves(test, internal, states.external_sites, alpha),
        per_class=_per_class(pooled_test, alpha),
        states=states,
        primary=primary,
        headline=HEADLINE[type(pooled_test).__name__],
    )


#: The metrics shown first, per kind of metric states.
HEADLINE: dict[str, tuple[str, ...]] = {
    "ClassificationStates": ("auc", "sensitivity", "specificity", "ece"),
    "SegmentationStates": ("dice_case_mean", "dice", "hd95_mean", "case_detection_rate"),
    "DetectionStates": ("ap50", "map", "froc", "sensitivity_at_1_fp"),
    "InstanceStates": ("ap50", "map", "instance_dice", "box_ap50"),
}


def _per_class(states: Any, alpha: float) -> pd.DataFrame:
    if isinstance(states, SegmentationStates):
        return pd.DataFrame(states.per_class())
    if isinstance(states, DetectionStates):
        return pd.DataFrame(
            [
                {"class": c, "ap50": states.average_precision(0.5, c)}
                for c in range(states.num_classes)
            ]
        )
    return pd.DataFrame(ev.per_class_one_vs_rest(states.histogram, alpha))


def _attributes(settings: Mapping[str, Any]) -> list[str]:
    return [a.strip() for a in str(settings.get("subgroups", "")).split(",") if a.strip()]


def _metric_table(metrics: Mapping[str, ev.MetricWithCI]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "metric": m.name,
                "value": m.value,
                "low": m.low,
                "high": m.high,
                "n": m.n,
                "method": m.method,
            }
            for m in metrics.values()
        ]
    )


def _site_table(
    split: SplitStates, external: list[str], threshold: float, alpha: float
) -> pd.DataFrame:
    rows = []
    for site in sorted(split.sites):
        states = split.sites[site]
        metrics = metrics_with_ci(states, threshold, alpha)
        row: dict[str, Any] = {
            "site": site,
            "role": "external (left out of training)" if site in external else "training",
            "n": int(states.count),
            "positives": _positives(states),
        }
        for name, metric in metrics.items():
            row[name] = metric.value
            row[f"{name}_low"], row[f"{name}_high"] = metric.low, metric.high
        rows.append(row)
    return pd.DataFrame(rows)


def _positives(states: Any) -> int | None:
    if isinstance(states, ClassificationStates) and states.num_classes == 2:
        return int(states.histogram[1, 1].sum())
    return None


def _subgroup_table(
    split: SplitStates,
    sites: list[str],
    overall_states: Any,
    threshold: float,
    alpha: float,
    attributes: list[str],
) -> pd.DataFrame:
    """Long table: one row per (attribute, group, metric).

    ``gap`` is the group's value minus the overall value; ``gap_to_rest`` the group minus the
    other groups of the same attribute pooled (disjoint patients), with its interval.
    """
    overall = metrics_with_ci(overall_states, threshold, alpha)
    groups: dict[str, dict[str, tuple[Any, int, list[str], list[str]]]]
    groups = {}
    for cell in sorted(set(split.cells) | set(split.suppressed)):
        attribute, value = parse_cell_name(cell)
        if attribute not in attributes:
            continue
        pooled, patients = split.pooled_cell(cell, sites)
        sent = sorted(s for s in split.cells.get(cell, {}) if s in sites)
        hidden = sorted(s for s in split.suppressed.get(cell, []) if s in sites)
        groups.setdefault(attribute, {})[value] = (pooled if sent else None, patients, sent, hidden)
    if SITE_ATTRIBUTE in attributes:
        groups[SITE_ATTRIBUTE] = {
            s: (split.sites[s], -1, [s], []) for s in sites if s in split.sites
        }
    rows = []
    for attribute, by_value in groups.items():
        for value, (states, patients, sent, hidden) in by_value.items():
            base: dict[str, Any] = {
                "attribute": attribute,
                "group": value,
                "patients": patients if patients >= 0 and states is not None else None,
                "sites_reporting": ",".join(sent),
                "sites_suppressed": ",".join(hidden),
            }
            if states is None:
                for name in overall:
                    rows.append({**base, "metric": name, "status": SUPPRESSED})
                continue
            rest = _sum(
                split.task,
                states.num_classes,
                [s for v, (s, *_) in by_value.items() if v != value and s is not None],
            )
            mine = metrics_with_ci(states, threshold, alpha)
            others = metrics_with_ci(rest, threshold, alpha) if rest.count else {}
            for name, metric in mine.items():
                gap, low, high, method = (
                    difference_ci(metric, others[name], alpha)
                    if name in others
                    else (math.nan, math.nan, math.nan, "undefined")
                )
                rows.append(
                    {
                        **base,
                        "metric": name,
                        "status": "partial" if hidden else "ok",
                        "n": metric.n,
                        "value": metric.value,
                        "low": metric.low,
                        "high": metric.high,
                        "method": metric.method,
                        "gap": metric.value - overall[name].value,
                        "gap_to_rest": gap,
                        "gap_low": low,
                        "gap_high": high,
                        "gap_method": method,
                    }
                )
    columns = [
        "attribute",
        "group",
        "metric",
        "status",
        "n",
        "patients",
        "value",
        "low",
        "high",
        "method",
        "gap",
        "gap_to_rest",
        "gap_low",
        "gap_high",
        "gap_method",
        "sites_reporting",
        "sites_suppressed",
    ]
    return pd.DataFrame(rows, columns=columns)


def fairness_table(subgroups: pd.DataFrame, primary: str = "auc") -> pd.DataFrame:
    """Per attribute: largest gap in ``primary`` (AUC, per-case Dice, AP), equal-opportunity
    and equalized-odds differences, calibration gap, over the groups with values (``unknown``
    and suppressed groups excluded).

    Equal opportunity compares true-positive rates (sensitivity); equalized odds takes the
    larger of the TPR and FPR (1 - specificity) spreads; the calibration gap is the spread of
    the expected calibration error.
    """
    rows = []
    known = subgroups[(subgroups["status"] != SUPPRESSED) & (subgroups["group"] != "unknown")]
    for attribute, table in known.groupby("attribute", sort=False):
        values = table.pivot_table(index="group", columns="metric", values="value")

        def spread(metric: str, frame: pd.DataFrame = values) -> tuple[float, str]:
            if metric not in frame or frame[metric].dropna().size < 2:
                return math.nan, ""
            column = frame[metric].dropna()
            if column.max() == column.min():  # no pair stands out: do not name one group twice
                return 0.0, "equal in every group"
            return float(column.max() - column.min()), f"{column.idxmax()} vs {column.idxmin()}"

        auc_gap, auc_groups = spread(primary)
        tpr_gap, tpr_groups = spread("sensitivity")
        fpr_gap, _ = spread("specificity")
        ece_gap, ece_groups = spread("ece")
        rows.append(
            {
                "attribute": attribute,
                "groups": int(values.shape[0]),
                f"largest_{primary}_gap": auc_gap,
                f"{primary}_gap_between": auc_groups,
                "equal_opportunity_difference": tpr_gap,
                "tpr_gap_between": tpr_groups,
                "equalized_odds_difference": (
                    max(tpr_gap, fpr_gap)
                    if math.isfinite(tpr_gap) and math.isfinite(fpr_gap)
                    else math.nan
                ),
                "calibration_gap": ece_gap,
                "calibration_gap_between": ece_groups,
            }
        )
    return pd.DataFrame(rows)


def _confusion(states: Any, threshold: float) -> np.ndarray:
    if isinstance(states, SegmentationStates | DetectionStates):
        return np.zeros((0, 0), dtype=np.int64)
    if states.num_classes != 2:
        return states.confusion.copy()
    counts = ev.threshold_metrics(*positive_histograms(states), threshold)
    return np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]], dtype=np.int64)


def _curves(
    split: SplitStates, internal: list[str], external: list[str], alpha: float
) -> list[CurveSet]:
    if split.task != "classification" or split.num_classes != 2:
        return []
    populations = [("pooled", split.pooled(internal))]
    populations += [(site, split.sites[site]) for site in sorted(split.sites)]
    curves = []
    for label, states in populations:
        neg, pos = positive_histograms(states)
        if states.count == 0:
            continue
        fpr, tpr, _ = ev.roc_curve_from_histogram(neg, pos)
        auc, low, high, _ = ev.delong_ci(neg, pos, alpha)
        mean_predicted, observed, counts, ece = ev.calibration_from_histogram(neg, pos, 10)
        name = f"{label} (external)" if label in external else label
        curves.append(
            CurveSet(
                name,
                fpr,
                tpr,
                ev.MetricWithCI("auc", auc, low, high, "DeLong", int(states.count)),
                mean_predicted,
                observed,
                counts,
                ece,
            )
        )
    return curves
