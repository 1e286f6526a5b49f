"""The report's files: CSV tables, a Markdown subgroup page, plots and a model card.

``write_report(report, folder)`` writes, from a :class:`common.report.Report`:

==========================  ==================================================================
``metrics.csv``             pooled test metrics with intervals and their method
``validation_metrics.csv``  the same on the validation split (where the threshold was chosen)
``sites.csv``               per-site test metrics with intervals (external sites marked)
``subgroups.csv``           the long subgroup table (value, interval, n, gaps, suppression)
``fairness.csv``            per attribute: gap in the task's primary metric, equal opportunity,
                            equalized odds, calibration
``subgroups.md``            the subgroup tables as a readable page
``cross_site.csv``          each site's local-only model on every site (when requested)
``roc.png``                 ROC curves, pooled and per site, AUC with DeLong interval
``calibration.png``         reliability curves, pooled and per site, with ECE
``confusion.png``           the confusion matrix at the operating threshold
``subgroups.png``           subgroup values of the primary metric (AUC, per-case Dice) with
                            intervals against the overall value
``model_card.md``           data per site, metrics, subgroup findings, intended use and limits
``states.json``             the stored states every file above is computed from
==========================  ==================================================================

Where the states carry them (classification's final evaluation), the trust files of
``common.report_trust`` too: ``trust.csv``, ``selective.csv``,
``calibration_before_after.png`` and ``selective.png``.

ROC and calibration plots exist where the task's states draw curves (binary classification),
the confusion plot where they have a confusion matrix (classification).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from common.report import SUPPRESSED, Report  # noqa: E402
from common.report_trust import trust_markdown, write_trust_files  # noqa: E402

FILES = (
    "metrics.csv",
    "validation_metrics.csv",
    "sites.csv",
    "subgroups.csv",
    "fairness.csv",
    "subgroups.md",
    "roc.png",
    "calibration.png",
    "confusion.png",
    "subgroups.png",
    "model_card.md",
    "states.json",
)


def write_report(report: Report, folder: Path) -> list[Path]:
    """Write every report file into ``folder``; returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save_csv(name: str, table: pd.DataFrame) -> None:
        path = folder / name
        table.to_csv(path, index=False, float_format="%.6g")
        written.append(path)

    def save_text(name: str, text: str) -> None:
        path = folder / name
        path.write_text(text)
        written.append(path)

    save_csv("metrics.csv", report.overall)
    save_csv("validation_metrics.csv", report.validation_overall)
    save_csv("sites.csv", report.sites)
    save_csv("subgroups.csv", report.subgroups)
    save_csv("fairness.csv", report.fairness)
    if report.states.cross_site:
        save_csv("cross_site.csv", cross_site_table(report.states.cross_site).reset_index())
    save_text("subgroups.md", subgroup_page(report))
    save_text("model_card.md", model_card(report))
    save_text("states.json", json.dumps(report.states.to_json()))
    plots = [("subgroups.png", _plot_subgroups)]
    if report.curves:
        plots += [("roc.png", _plot_roc), ("calibration.png", _plot_calibration)]
    if report.confusion.size:
        plots.append(("confusion.png", _plot_confusion))
    for name, draw in plots:
        path = folder / name
        draw(report, path)
        written.append(path)
    written += write_trust_files(report, folder)
    return written


def cross_site_table(matrix: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Rows: the model (trained at a site, or federated); columns: the site evaluated on."""
    table = pd.DataFrame(matrix).T
    table.index.name = "model"
    return table.sort_index(axis=0).sort_index(axis=1)


# --------------------------------------------------------------------------- markdown
def fmt_ci(value: Any, low: Any, high: Any, digits: int = 3) -> str:
    """``0.812 (0.771-0.853)``; a NaN bound gives the value alone, a NaN value ``n/a``."""
    if value is None or not _finite(value):
        return "n/a"
    if _finite(low) and _finite(high):
        return f"{value:.{digits}f} ({low:.{digits}f} to {high:.{digits}f})"
    return f"{value:.{digits}f}"


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _markdown(table: pd.DataFrame) -> str:
    """``table`` as a Markdown table (pandas' ``to_markdown``, through tabulate)."""
    if table.empty:
        return "_(none)_\n"
    return table.to_markdown(index=False, tablefmt="pipe", disable_numparse=True) + "\n"


def metrics_markdown(table: pd.DataFrame) -> str:
    rows = pd.DataFrame(
        {
            "metric": table["metric"],
            "value (95% CI)": [
                fmt_ci(r.value, r.low, r.high) for r in table.itertuples(index=False)
            ],
            "n": table["n"],
            "interval": table["method"],
        }
    )
    return _markdown(rows)


def subgroup_markdown(report: Report) -> str:
    """One table per attribute: groups as rows, metrics with intervals as columns."""
    table = report.subgroups
    gap_column = f"{report.primary} gap to rest (CI)"
    parts = []
    for attribute, rows in table.groupby("attribute", sort=False):
        display: dict[str, dict[str, Any]] = {}
        for row in rows.itertuples(index=False):
            entry = display.setdefault(
                row.group,
                {
                    "group": row.group,
                    "patients": "" if pd.isna(row.patients) else int(row.patients),
                },
            )
            if row.status == SUPPRESSED:
                entry["status"] = "withheld at every site (small, or complementary)"
                continue
            if row.metric in report.headline:
                entry[row.metric] = fmt_ci(row.value, row.low, row.high)
            if row.metric == report.primary:
                entry[gap_column] = fmt_ci(row.gap_to_rest, row.gap_low, row.gap_high)
                entry["n"] = int(row.n)
            entry["status"] = (
                f"partial: suppressed at {row.sites_suppressed}" if row.status == "partial" else ""
            )
        columns = ["group", "patients", "n", report.primary, gap_column]
        columns += [m for m in report.headline if m != report.primary] + ["status"]
        frame = pd.DataFrame(list(display.values()), columns=columns)
        frame["status"] = frame["status"].fillna("")
        frame = frame.fillna("suppressed")
        parts.append(f"### {attribute}\n\n{_markdown(frame)}")
    return "\n".join(parts) if parts else "_No subgroup was declared or reported._\n"


def subgroup_page(report: Report) -> str:
    k = report.states.settings.get("min_cell_size", "k")
    return "\n".join(
        [
            "# Subgroup report (test split, final model)",
            "",
            f"Operating threshold: {report.threshold_note}.",
            f"Intervals: {100 * (1 - report.alpha):.0f}% (AUC: DeLong; proportions: Wilson; "
            "gaps between disjoint groups: DeLong normal approximation or Newcombe).",
            f"A group with fewer than {k} patients at a site is withheld by that site and never "
            "sent, and so is any cell that would let it be derived by subtraction (complementary "
            "suppression; such a cell may be larger than k). A withheld group shows as "
            "withheld, never as a number.",
            "",
            "## Fairness summary",
            "",
            _markdown(report.fairness.round(4)),
            "## Groups",
            "",
            subgroup_markdown(report),
        ]
    )


def model_card(report: Report) -> str:
    """A Markdown model card (Mitchell et al., 2019), from the report's tables."""
    states = report.states
    run = states.run
    summary = pd.DataFrame(
        [{"site": site, **facts} for site, facts in sorted(states.site_summary.items())]
    )
    findings = _findings(report)
    external = (
        f"Sites left out of training and evaluated as external validation: "
        f"{', '.join(states.external_sites)}."
        if states.external_sites
        else "No site was left out of training (see `radfl simulate --leave-out`)."
    )
    sections = [
        f"# Model card: {run.get('model', '?')} for {run.get('task', '?')} "
        f"({run.get('spatial_dims', '?')}D)",
        "",
        f"MLflow run `{run.get('run_id', '?')}`; federated with {run.get('strategy', '?')} "
        f"over {run.get('num_rounds', '?')} rounds at {len(states.site_summary)} sites; "
        f"the model evaluated is the {run.get('final_model', '?')} global model "
        f"(round {run.get('selected_round', '?')}).",
        "",
        "## Intended use",
        "",
        "Research and validation of federated training only. Not a medical device: not for "
        "diagnosis or treatment decisions. The operating threshold was chosen on pooled "
        "validation data; a site adopting the model should confirm it on its own data.",
        "",
        "## Data (per site, as declared by each site)",
        "",
        _markdown(summary),
        "## Performance on the test split (used once, at the end)",
        "",
        f"Operating threshold: {report.threshold_note}.",
        "",
        metrics_markdown(report.overall),
        *trust_markdown(report),
        "## Per site",
        "",
        _markdown(_site_display(report.sites, report.headline)),
        "## External validation",
        "",
        external,
        "",
        "## Subgroup findings",
        "",
        *findings,
        "",
        "Full tables: `subgroups.md`, `subgroups.csv`, `fairness.csv`.",
        "",
        "## Limits",
        "",
        "- Intervals assume independent images; follow-up studies of one patient are counted "
        "as separate cases, which makes intervals somewhat narrow.",
        "- Suppressed subgroup cells are left out of their group's pooled value; a group "
        "marked partial rests on the sites that reported it.",
        "- AUC and its interval are computed from score histograms (2000 bins per class); "
        "they equal the per-patient values to within 0.002.",
        f"- Data: {run.get('data', 'the sites listed above')}.",
    ]
    if states.cross_site:
        sections += [
            "",
            "## Cross-site validation (validation AUC)",
            "",
            _markdown(cross_site_table(states.cross_site).round(3).reset_index()),
        ]
    return "\n".join(sections) + "\n"


def _site_display(sites: pd.DataFrame, headline: tuple[str, ...]) -> pd.DataFrame:
    if sites.empty:
        return sites
    out = pd.DataFrame({"site": sites["site"], "role": sites["role"], "n": sites["n"]})
    for metric in headline:
        if metric in sites:
            out[metric] = [
                fmt_ci(v, lo, hi)
                for v, lo, hi in zip(
                    sites[metric], sites[f"{metric}_low"], sites[f"{metric}_high"], strict=True
                )
            ]
    return out


def _findings(report: Report) -> list[str]:
    table = report.subgroups
    auc = table[(table["metric"] == report.primary) & (table["status"] != SUPPRESSED)]
    lines = []
    for row in auc.itertuples(index=False):
        if _finite(row.gap_low) and _finite(row.gap_high) and (row.gap_low > 0 or row.gap_high < 0):
            direction = "lower" if row.gap_to_rest < 0 else "higher"
            lines.append(
                f"- **{row.attribute}={row.group}**: {report.primary} "
                f"{fmt_ci(row.value, row.low, row.high)}, "
                f"{direction} than the other {row.attribute} groups by "
                f"{fmt_ci(abs(row.gap_to_rest), *sorted((abs(row.gap_low), abs(row.gap_high))))} "
                "(interval excludes zero)."
            )
    hidden = table[table["status"] == SUPPRESSED]
    suppressed = sorted({f"{r.attribute}={r.group}" for r in hidden.itertuples(index=False)})
    if not lines:
        lines.append(
            f"- No subgroup's {report.primary} differs from the rest with an interval excluding "
            "zero."
        )
    if suppressed:
        lines.append(f"- Suppressed everywhere (too few patients): {', '.join(suppressed)}.")
    return lines


# ------------------------------------------------------------------------------ plots
def _plot_roc(report: Report, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for curve in report.curves:
        style: dict[str, Any] = (
            {"linewidth": 2.5, "color": "black"} if curve.label == "pooled" else {}
        )
        label = f"{curve.label}: AUC {fmt_ci(curve.auc.value, curve.auc.low, curve.auc.high)}"
        ax.plot(curve.fpr, curve.tpr, label=label, **style)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    overall = report.overall.set_index("metric")["value"]
    if _finite(report.threshold) and {"sensitivity", "specificity"} <= set(overall.index):
        ax.plot(
            1 - overall["specificity"],
            overall["sensitivity"],
            marker="*",
            markersize=14,
            color="red",
            linestyle="none",
            label=f"operating point (threshold {report.threshold:.3f})",
        )
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC, test split")
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def _plot_calibration(report: Report, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for curve in report.curves:
        present = curve.counts > 0
        style: dict[str, Any] = (
            {"linewidth": 2.5, "color": "black"} if curve.label == "pooled" else {}
        )
        ax.plot(
            curve.mean_predicted[present],
            curve.observed[present],
            marker="o",
            label=f"{curve.label}: ECE {curve.ece:.3f}",
            **style,
        )
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set(
        xlabel="mean predicted probability",
        ylabel="observed fraction positive",
        title="Calibration, test split",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(fontsize=7, loc="upper left")
    _save(fig, path)


def _plot_confusion(report: Report, path: Path) -> None:
    matrix = report.confusion
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(int(value)), ha="center", va="center")
    ticks = range(matrix.shape[0])
    ax.set(
        xticks=list(ticks),
        yticks=list(ticks),
        xlabel="predicted class",
        ylabel="true class",
        title=f"Confusion, test split (threshold {report.threshold:.3f})"
        if _finite(report.threshold)
        else "Confusion, test split (arg-max)",
    )
    _save(fig, path)


def _plot_subgroups(report: Report, path: Path) -> None:
    table = report.subgroups
    rows = table[(table["metric"] == report.primary) & (table["status"] != SUPPRESSED)]
    overall = report.overall.set_index("metric")["value"].get(report.primary, math.nan)
    fig, ax = plt.subplots(figsize=(6, 0.35 * max(len(rows), 2) + 1.2))
    labels = [f"{r.attribute}={r.group}" for r in rows.itertuples(index=False)]
    y = np.arange(len(rows))
    values = rows["value"].to_numpy(dtype=float)
    low = values - rows["low"].to_numpy(dtype=float)
    high = rows["high"].to_numpy(dtype=float) - values
    ax.errorbar(values, y, xerr=np.nan_to_num(np.vstack([low, high])), fmt="o", color="black")
    if _finite(overall):
        ax.axvline(overall, linestyle="--", color="grey", label=f"overall {overall:.3f}")
        ax.legend(fontsize=7)
    ax.set(
        yticks=y,
        yticklabels=labels,
        xlabel=f"{report.primary} ({100 * (1 - report.alpha):.0f}% CI)",
        title=f"Subgroup {report.primary}, test split",
    )
    ax.invert_yaxis()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
