"""The report's trust section: calibration before and after temperature scaling, the
selective-prediction curve and attention inside the lesion, pooled, per site and per subgroup.

Files (where the task's states carry them, binary or multi-class classification):

==============================  ==============================================================
``trust.csv``                   per population (``pooled``, each site, each ``attribute=value``
                                cell): cases, ECE before and after, attention inside the lesion
                                with its interval and the cases it rests on
``selective.csv``               per population and entropy cut-off: referred share, kept cases,
                                AUC, sensitivity and specificity (or accuracy) of the kept cases
``calibration_before_after.png`` pooled test reliability curves at T = 1 and at the fitted T
``selective.png``               pooled and per-site selective-prediction curves (AUC against
                                the referred share)
==============================  ==============================================================
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from common.report import Report  # noqa: E402
from common.states import TrustSummary  # noqa: E402

#: Referred shares the Markdown summary quotes (the nearest cut-off at or above each).
QUOTED_SHARES = (0.0, 0.1, 0.2, 0.3)


def trust_table(report: Report) -> pd.DataFrame:
    rows = []
    for summary in report.trust:
        rows.append(
            {
                "population": summary.label,
                "n": summary.count,
                "temperature": report.temperature,
                "ece_before": summary.ece_before,
                "ece_after": summary.ece_after,
                "attention_in_lesion": summary.attention.value,
                "attention_low": summary.attention.low,
                "attention_high": summary.attention.high,
                "attention_cases": summary.attention.n,
            }
        )
    return pd.DataFrame(rows)


def selective_table(report: Report) -> pd.DataFrame:
    return pd.DataFrame(
        [{"population": s.label, **row} for s in report.trust for row in s.selective]
    )


def write_trust_files(report: Report, folder: Path) -> list[Path]:
    """Write the trust files into ``folder`` (none without trust states)."""
    if not report.trust:
        return []
    paths = [folder / "trust.csv", folder / "selective.csv"]
    trust_table(report).to_csv(paths[0], index=False, float_format="%.6g")
    selective_table(report).to_csv(paths[1], index=False, float_format="%.6g")
    pooled = report.trust[0]
    if pooled.reliability_before[2].sum():
        paths.append(folder / "calibration_before_after.png")
        _plot_calibration(report, pooled, paths[-1])
    if pooled.selective:
        paths.append(folder / "selective.png")
        _plot_selective(report, paths[-1])
    return paths


def trust_markdown(report: Report) -> list[str]:
    """The model card's trust section (empty without trust states)."""
    if not report.trust:
        return []
    pooled = report.trust[0]
    lines = [
        "## Calibration, uncertainty and attention (test split)",
        "",
        f"Temperature fitted on pooled validation NLL: T = {report.temperature:.3f}; "
        f"pooled test ECE {pooled.ece_before:.3f} before, {pooled.ece_after:.3f} after "
        "(the registered model applies T; its threshold is moved so that its decisions stay "
        "the same).",
        "",
    ]
    metric = "auc" if pooled.selective and "auc" in pooled.selective[0] else "accuracy"
    for share in QUOTED_SHARES:
        row = next((r for r in pooled.selective if r["referred_share"] >= share), None)
        if row is not None:
            lines.append(
                f"- referring the most uncertain {100 * row['referred_share']:.0f}% "
                f"(entropy >= {row['entropy_below']:.2f}): {metric} {row[metric]:.3f} on "
                f"{row['kept']} kept cases"
            )
    attention = pooled.attention
    if math.isfinite(attention.value):
        lines.append(
            f"- Grad-CAM mass inside the lesion: {attention.value:.3f} "
            f"[{attention.low:.3f}, {attention.high:.3f}] over {attention.n} cases with a "
            "lesion mask"
        )
    lines += ["", "Per site and subgroup: `trust.csv`, `selective.csv`.", ""]
    return lines


def trust_metrics(report: Report) -> dict[str, float]:
    """MLflow metrics of the trust section: ``test/temperature``, ``test/ece-before``,
    ``test/ece-after``, ``test/attention_in_lesion`` (pooled), and the pooled selective AUC
    (or accuracy) at the quoted referred shares."""
    if not report.trust:
        return {}
    pooled = report.trust[0]
    out = {
        "test/temperature": report.temperature,
        "test/ece-before": pooled.ece_before,
        "test/ece-after": pooled.ece_after,
        "test/attention_in_lesion": pooled.attention.value,
    }
    metric = "auc" if pooled.selective and "auc" in pooled.selective[0] else "accuracy"
    for share in QUOTED_SHARES[1:]:
        row = next((r for r in pooled.selective if r["referred_share"] >= share), None)
        if row is not None:
            out[f"test/selective-{metric}-refer{int(100 * share)}"] = row[metric]
    return {k: float(v) for k, v in out.items() if math.isfinite(float(v))}


def _plot_calibration(report: Report, pooled: TrustSummary, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for (mean, observed, counts), name, ece in (
        (pooled.reliability_before, "before (T = 1)", pooled.ece_before),
        (pooled.reliability_after, f"after (T = {report.temperature:.2f})", pooled.ece_after),
    ):
        present = counts > 0
        ax.plot(mean[present], observed[present], marker="o", label=f"{name}: ECE {ece:.3f}")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set(
        xlabel="mean confidence",
        ylabel="observed rate",
        title="Temperature scaling, pooled test split",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(fontsize=8, loc="upper left")
    _save(fig, path)


def _plot_selective(report: Report, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for summary in report.trust:
        if "=" in summary.label or not summary.selective:
            continue  # subgroups: in selective.csv
        metric = "auc" if "auc" in summary.selective[0] else "accuracy"
        style: dict[str, Any] = (
            {"linewidth": 2.5, "color": "black"} if summary.label == "pooled" else {}
        )
        ax.plot(
            [100 * r["referred_share"] for r in summary.selective],
            [r[metric] for r in summary.selective],
            marker=".",
            label=summary.label,
            **style,
        )
        ax.set_ylabel(f"{metric} of the kept cases")
    ax.set(xlabel="% most uncertain cases referred", title="Selective prediction, test split")
    ax.legend(fontsize=7)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
