"""The evaluation report: pooled metrics with intervals, per-site and subgroup tables, fairness.

Everything here reads summed metric states (a task's :class:`common.states.SummableStates`),
never a per-patient prediction, and asks the split's task (its primary and headline metrics,
its operating threshold) and the states (their summary with intervals, per-class rows,
confusion matrix, curves): nothing here branches on a task. :func:`build_report` turns stored
:class:`EvaluationStates` into tables; ``common.report_files`` writes those as CSV, Markdown,
plots and a model card. ``radfl report RUN_ID`` runs the same two steps on the stored JSON, so
a regenerated report equals the first.

The operating threshold is chosen on the pooled *validation* states of the final model and
applied unchanged to the test states. Sites left out of training (``leave-out``) are kept out
of every pooled value and reported on their own, as external validation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from common import evaluation as ev
from common.intervals import difference_ci
from common.metrics import ClassificationStates
from common.report_states import SPLITS, EvaluationStates, SplitStates
from common.splits import TEST, VALIDATION
from common.states import CurveSet, SummableStates, TrustSummary
from common.subgroups import SITE_ATTRIBUTE, parse_cell_name

__all__ = [
    "SPLITS",
    "SUPPRESSED",
    "TEST",
    "VALIDATION",
    "CurveSet",
    "EvaluationStates",
    "Report",
    "SplitStates",
    "build_report",
    "difference_ci",
    "fairness_table",
    "metrics_with_ci",
    "positive_histograms",
]

#: Metrics of the subgroup table and the per-site table, in display order.
CELL_METRICS = ("auc", "sensitivity", "specificity", "ppv", "npv", "accuracy", "ece")
SUPPRESSED = "suppressed"


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
    #: The task's primary metric (subgroup gaps centre on it) and the ones shown first.
    primary: str = "auc"
    headline: tuple[str, ...] = ("auc", "sensitivity", "specificity", "ece")
    #: The calibration temperature fitted on pooled validation (NaN: the task has none).
    temperature: float = math.nan
    #: Calibration, selective prediction and attention: pooled test, each site, each
    #: subgroup cell (``attribute=value``), where the states carry them.
    trust: list[TrustSummary] = field(default_factory=list)


def positive_histograms(states: ClassificationStates) -> tuple[np.ndarray, np.ndarray]:
    """``(neg, pos)`` score histograms of the positive class (class 1; binary tasks)."""
    return states.positive_histograms()


def metrics_with_ci(
    states: SummableStates, threshold: float, alpha: float
) -> dict[str, ev.MetricWithCI]:
    """The states' summary at ``threshold`` with ``1 - alpha`` intervals."""
    return states.summary(1.0 - alpha, threshold)


def build_report(states: EvaluationStates) -> Report:
    """All tables of the report from stored states (no data, no model)."""
    settings = states.settings
    alpha = 1.0 - float(settings.get("confidence_level", 0.95))
    internal = states.internal_sites
    validation = states.splits[VALIDATION].pooled(
        [s for s in states.splits[VALIDATION].sites if s not in states.external_sites]
    )
    threshold, note = states.splits[TEST].task_type.operating_threshold(
        validation,
        str(settings.get("threshold_method", "youden")),
        float(settings.get("target_sensitivity", 0.9)),
    )
    temperature = validation.fitted_temperature()
    test = states.splits[TEST]
    task = test.task_type
    pooled_test = test.pooled(internal)
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
        fairness=fairness_table(subgroups, task.primary_metric),
        confusion=pooled_test.confusion_at(threshold),
        curves=_curves(test, internal, states.external_sites, alpha),
        per_class=pd.DataFrame(pooled_test.per_class(1.0 - alpha)),
        states=states,
        primary=task.primary_metric,
        headline=task.headline_metrics,
        temperature=temperature,
        trust=_trust(test, internal, pooled_test, temperature, threshold, alpha),
    )


def _trust(
    split: SplitStates,
    internal: list[str],
    pooled: SummableStates,
    temperature: float,
    threshold: float,
    alpha: float,
) -> list[TrustSummary]:
    """Trust summaries of the pooled internal sites, each site and each subgroup cell."""
    populations: list[tuple[str, SummableStates]] = [("pooled", pooled)]
    populations += [(site, split.sites[site]) for site in sorted(split.sites)]
    for cell in sorted(split.cells):
        states, _ = split.pooled_cell(cell, internal)
        populations.append((cell, states))
    found = []
    for label, states in populations:
        summary = states.trust(label, temperature, threshold, 1.0 - alpha)
        if summary is not None:
            found.append(summary)
    return found


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
            "positives": states.positives(),
        }
        for name, metric in metrics.items():
            row[name] = metric.value
            row[f"{name}_low"], row[f"{name}_high"] = metric.low, metric.high
        rows.append(row)
    return pd.DataFrame(rows)


def _subgroup_table(
    split: SplitStates,
    sites: list[str],
    overall_states: SummableStates,
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
            rest = split.sum(s for v, (s, *_) in by_value.items() if v != value and s is not None)
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


def _curves(
    split: SplitStates, internal: list[str], external: list[str], alpha: float
) -> list[CurveSet]:
    """Curves of the pooled internal sites and of each site, where the states draw any."""
    populations = [("pooled", split.pooled(internal))]
    populations += [(site, split.sites[site]) for site in sorted(split.sites)]
    curves = []
    for label, states in populations:
        name = f"{label} (external)" if label in external else label
        curve = states.curves(name, 1.0 - alpha)
        if curve is not None:
            curves.append(curve)
    return curves
