"""Selective prediction: what the model scores when its most uncertain cases are referred.

Each case's uncertainty is its predictive entropy ``H``, divided by ``log(C)`` so that it
lies in [0, 1] (``common.uncertainty`` gives it: MC dropout by default). Sites cannot pool
entropy *quantiles* exactly, so a site sends a fixed-grid histogram instead (summable):
``selective[e, h, s]`` counts the cases of entropy bin ``e``, hit ``h`` (two classes: the
label is positive; more: the top class is right) and score bin ``s`` (:data:`SCORE_BINS`
equal-width bins of the positive class's probability, or of the top class's). The entropy
bins are :data:`ENTROPY_BINS` equal-width bins of ``1 - sqrt(1 - H)``: for two classes
``sqrt(1 - H)`` is nearly proportional to the margin ``|p - 1/2|``, so the bins are about
equally wide in probability (equal-width bins of ``H`` itself put every case with ``p`` in
[0.38, 0.62] into the top bin). Referring every case of entropy bin ``e`` and above keeps the
lower bins; the pooled curve is exact at these cut-offs, and the referred share at each
cut-off is whatever share of cases lies above it (a share between two cut-offs is not
interpolated).

For two classes each point carries the AUC of the kept cases (Mann-Whitney from the score
histogram, pairs in one bin counted one half) and the sensitivity and specificity at the
operating threshold rounded to the score grid (1 / ``SCORE_BINS``); for more classes, the
accuracy of the kept cases.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from common import evaluation as ev

ENTROPY_BINS = 20
SCORE_BINS = 100


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Predictive entropy of each row of ``probs`` ``(N, C)`` over ``log(C)``: 0 (certain) to 1."""
    p = probs.detach().double().clamp(min=0.0)
    terms = torch.where(p > 0, -p * torch.log(p.clamp(min=1e-300)), torch.zeros_like(p))
    return (terms.sum(dim=1) / math.log(p.shape[1])).clamp(0.0, 1.0)


def selective_histogram(
    probs: torch.Tensor, target: torch.Tensor, entropy: torch.Tensor
) -> np.ndarray:
    """``(ENTROPY_BINS, 2, SCORE_BINS)`` counts of one batch (see the module docstring);
    ``probs`` scores the case, ``entropy`` (normalised) ranks its uncertainty."""
    p = probs.detach().double().cpu()
    t = target.detach().long().view(-1).cpu()
    if p.shape[1] == 2:
        score, hit = p[:, 1], (t == 1)
    else:
        score, top = p.max(dim=1)
        hit = top == t
    spread = 1.0 - torch.sqrt(1.0 - entropy.detach().double().cpu().clamp(0.0, 1.0))
    e_bin = (spread * ENTROPY_BINS).long().clamp(0, ENTROPY_BINS - 1)
    s_bin = (score * SCORE_BINS).long().clamp(0, SCORE_BINS - 1)
    out = np.zeros((ENTROPY_BINS, 2, SCORE_BINS), dtype=np.int64)
    np.add.at(out, (e_bin.numpy(), hit.long().numpy(), s_bin.numpy()), 1)
    return out


def entropy_cut(keep: int) -> float:
    """The normalised entropy below which the lowest ``keep`` bins lie."""
    return 1.0 - (1.0 - keep / ENTROPY_BINS) ** 2


def selective_curve(histogram: np.ndarray, threshold: float, binary: bool) -> list[dict[str, Any]]:
    """One row per entropy cut-off, from keeping every case (nothing referred) down to
    keeping the most certain bin only: the referred share, the kept cases and their AUC,
    sensitivity and specificity (two classes) or accuracy (more). Empty without cases."""
    total = int(histogram.sum())
    if total == 0:
        return []
    rounded = round(threshold * SCORE_BINS) / SCORE_BINS if math.isfinite(threshold) else math.nan
    rows = []
    for keep in range(ENTROPY_BINS, 0, -1):
        kept = histogram[:keep].sum(axis=0)  # (2, SCORE_BINS)
        n = int(kept.sum())
        row: dict[str, Any] = {
            "entropy_below": entropy_cut(keep),
            "referred_share": 1.0 - n / total,
            "kept": n,
        }
        if binary:
            neg, pos = kept[0], kept[1]
            row["auc"] = ev.auc_from_histogram(neg, pos)
            if math.isfinite(rounded) and n:
                counts = ev.threshold_metrics(neg, pos, rounded)
                row["sensitivity"] = counts["sensitivity"]
                row["specificity"] = counts["specificity"]
            else:
                row["sensitivity"] = row["specificity"] = math.nan
        else:
            row["accuracy"] = float(kept[1].sum() / n) if n else math.nan
        rows.append(row)
    return rows
