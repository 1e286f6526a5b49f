"""Multi-label classification metrics whose states add up across sites.

Each finding is a binary problem of its own: the states are one binary
:class:`common.metrics.ClassificationStates` per finding (score histograms of the finding's
sigmoid output for images with and without it, and its confusion matrix at 0.5), named
``finding-1``, ``finding-2``, ... in the order of the manifest's ``labels`` flags. Nothing here
is new arithmetic: per-finding AUC (DeLong), sensitivity and specificity (Wilson) are the binary
task's own, on that finding's states.

Summaries over findings, as scikit-learn's ``roc_auc_score(average=...)`` defines them:

- **macro** AUC: the mean of the findings' AUCs. Its interval combines their DeLong standard
  errors as if the findings were perfectly correlated (``se = mean of the se``): the AUCs of
  findings read on the same images are correlated by an amount the summed histograms cannot
  tell, and the standard deviation of a mean is never larger than the mean of the standard
  deviations, so the interval is conservative whatever that correlation;
- **micro** AUC: one AUC over every (image, finding) pair, from the findings' histograms
  summed; its DeLong interval treats the pairs as cases (it ignores that the pairs of one
  image are correlated).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from common import evaluation as ev
from common.errors import ConfigError
from common.intervals import MetricWithCI, z_value
from common.metrics import ClassificationStates
from common.states import CurveSet, MetricInfo, SummableStates

MULTILABEL_METRICS: dict[str, MetricInfo] = {
    info.name: info
    for info in (
        MetricInfo("auc", True),
        MetricInfo("auc_micro", True),
        MetricInfo("sensitivity", True),
        MetricInfo("specificity", True),
        MetricInfo("loss", False),
    )
}


def finding_name(index: int) -> str:
    """``finding-1`` for the first flag of the ``labels`` column."""
    return f"finding-{index + 1}"


@dataclass
class MultilabelStates(SummableStates):
    """Summable states of ``num_findings`` binary findings read on the same images.

    ``count`` is the number of images (each carries a flag for every finding) and ``loss_sum``
    their binary cross-entropy summed over images and averaged over findings, so ``loss`` is
    the mean BCE per image and finding, as ``BCEWithLogitsLoss`` averages it.
    """

    num_findings: int
    num_bins: int = 2000
    findings: list[ClassificationStates] = field(init=False, repr=False)
    arrays: dict[str, np.ndarray] = field(init=False, repr=False)
    loss_sum: float = field(init=False, default=0.0)
    count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.num_findings < 1:
            raise ConfigError(f"a multi-label task needs >= 1 finding, got {self.num_findings}")
        self.findings = [ClassificationStates(2, self.num_bins) for _ in range(self.num_findings)]
        # The findings' own arrays, by reference: the base's add_record adds into them.
        self.arrays = {
            f"{finding_name(k)}/{name}": array
            for k, states in enumerate(self.findings)
            for name, array in states.arrays.items()
        }

    # ----------------------------------------------------------------- update
    def update(self, probs: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add a batch of finding probabilities ``(N, K)`` and 0/1 flags ``(N, K)``."""
        p = _to_numpy(probs).astype(np.float64)
        t = _to_numpy(target).astype(np.int64)
        if p.ndim != 2 or p.shape[1] != self.num_findings or t.shape != p.shape:
            raise ValueError(
                f"probs and target must both have shape (N, {self.num_findings}), got "
                f"{p.shape} and {t.shape}"
            )
        losses = 0.0
        for k, states in enumerate(self.findings):
            before = states.loss_sum
            states.update(np.stack([1.0 - p[:, k], p[:, k]], axis=1), t[:, k])
            losses += states.loss_sum - before
        self.loss_sum += losses / self.num_findings
        self.count += int(t.shape[0])

    def add_record(self, record: Mapping[str, object]) -> None:
        super().add_record(record)
        for states in self.findings:
            states.count = self.count

    # ---------------------------------------------------------------- compute
    def micro_histograms(self) -> tuple[np.ndarray, np.ndarray]:
        """``(neg, pos)``: every finding's histograms summed, one case per (image, finding)."""
        neg = sum(s.positive_histograms()[0] for s in self.findings)
        pos = sum(s.positive_histograms()[1] for s in self.findings)
        return np.asarray(neg), np.asarray(pos)

    def compute(self) -> dict[str, float]:
        """Macro and micro AUC, micro sensitivity and specificity at 0.5, loss, and each
        finding's AUC (``auc/finding-1``)."""
        per_finding = [s.compute() for s in self.findings]
        aucs = [m["auc"] for m in per_finding]
        confusion = sum(s.confusion for s in self.findings)
        tn, fp, fn, tp = (float(v) for v in np.asarray(confusion).reshape(-1))
        out = {
            "auc": _mean_finite(aucs),
            "auc_micro": ev.auc_from_histogram(*self.micro_histograms()),
            "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
            "specificity": tn / (tn + fp) if tn + fp else math.nan,
            "loss": self.loss_sum / self.count if self.count else math.nan,
        }
        out.update({f"auc/{finding_name(k)}": auc for k, auc in enumerate(aucs)})
        return {name: float(value) for name, value in out.items()}

    # ----------------------------------------------------------------- report
    def summary(self, confidence: float, threshold: float) -> dict[str, MetricWithCI]:
        """Macro AUC (conservative interval), micro AUC, sensitivity and specificity (over
        every pair), and per finding AUC (DeLong), sensitivity and specificity (Wilson) at
        ``threshold`` (``auc/finding-1``...: MLflow takes no brackets in a metric name)."""
        alpha = 1.0 - confidence
        nan = math.nan
        n = int(self.count)
        threshold = 0.5 if not math.isfinite(threshold) else threshold
        per_finding: dict[str, MetricWithCI] = {}
        aucs, errors = [], []
        for k, states in enumerate(self.findings):
            neg, pos = states.positive_histograms()
            report = {m.name: m for m in ev.binary_report(neg, pos, threshold, alpha)}
            auc, *_, se = ev.delong_ci(neg, pos, alpha)
            aucs.append(auc)
            errors.append(se)
            for name in ("auc", "sensitivity", "specificity"):
                metric = report[name]
                label = f"{name}/{finding_name(k)}"
                per_finding[label] = MetricWithCI(
                    label, metric.value, metric.low, metric.high, metric.method, metric.n
                )
        macro = _mean_finite(aucs)
        low = high = nan
        if all(math.isfinite(v) for v in aucs + errors):
            half = z_value(alpha) * float(np.mean(errors))
            low, high = max(0.0, macro - half), min(1.0, macro + half)
        micro = {m.name: m for m in ev.binary_report(*self.micro_histograms(), threshold, alpha)}
        out = {
            "auc": MetricWithCI("auc", macro, low, high, "DeLong, conservative over findings", n),
            "auc_micro": _renamed(micro["auc"], "auc_micro", "DeLong (pairs as cases)"),
            "sensitivity": micro["sensitivity"],
            "specificity": micro["specificity"],
        }
        out.update(per_finding)
        return out

    def per_class(self, confidence: float = 0.95) -> list[dict[str, float]]:
        """One row per finding: its AUC with DeLong's interval, positives and negatives."""
        histogram = np.stack([s.histogram[1] for s in self.findings])
        rows = ev.per_class_one_vs_rest(histogram, 1.0 - confidence)
        for k, row in enumerate(rows):
            row["finding"] = finding_name(k)  # type: ignore[assignment]
        return rows

    def confusion_at(self, threshold: float) -> np.ndarray:
        """``[[tn, fp], [fn, tp]]`` over every (image, finding) pair at ``threshold``."""
        counts = ev.threshold_metrics(*self.micro_histograms(), threshold)
        return np.array(
            [[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]], dtype=np.int64
        )

    def curves(self, label: str, confidence: float) -> CurveSet | None:
        """The micro-averaged ROC and reliability curves (every finding's pairs)."""
        if self.count == 0:
            return None
        neg, pos = self.micro_histograms()
        fpr, tpr, _ = ev.roc_curve_from_histogram(neg, pos)
        auc, low, high, _ = ev.delong_ci(neg, pos, 1.0 - confidence)
        mean_predicted, observed, counts, ece = ev.calibration_from_histogram(neg, pos, 10)
        return CurveSet(
            f"{label} (micro)",
            fpr,
            tpr,
            MetricWithCI(
                "auc_micro", auc, low, high, "DeLong (pairs as cases)", int(neg.sum() + pos.sum())
            ),
            mean_predicted,
            observed,
            counts,
            ece,
        )


def _renamed(metric: MetricWithCI, name: str, method: str) -> MetricWithCI:
    return MetricWithCI(name, metric.value, metric.low, metric.high, method, metric.n)


def _mean_finite(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _to_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    return np.asarray(value)
