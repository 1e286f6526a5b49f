"""Federated temperature scaling: summable NLL and reliability states over a fixed grid.

Temperature scaling (Guo et al., "On calibration of modern neural networks", ICML 2017)
divides a classifier's logits by one scalar ``T`` fitted to minimise the negative
log-likelihood on held-out data. Federated, no site may send its logits; each sends, for every
``T`` of a fixed grid (:data:`TEMPERATURES`, 2^-2 .. 2^2 in 33 log-spaced steps, 1.0 among
them), the NLL summed over its validation cases, and per grid point the counts, summed
confidences and summed hits of :data:`RELIABILITY_BINS` equal-width confidence bins. These
add up across sites, so the server picks the ``T`` of least pooled validation NLL (exactly the
pooled optimum over the grid: neighbouring grid points differ by 9%) and reads the test
split's expected calibration error (ECE) before (``T = 1``) and after (the chosen ``T``)
from the same states, with no second round trip.

The confidence of a case is the positive class's probability for two classes (as
torchmetrics' ``BinaryCalibrationError``: its hit is the label), else the top class's
probability (its hit: the top class is right).
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: The temperature grid every site evaluates (``TEMPERATURES[UNIT_INDEX] == 1.0``).
TEMPERATURES: np.ndarray = 2.0 ** np.linspace(-2.0, 2.0, 33)
UNIT_INDEX = 16
#: Equal-width confidence bins of the reliability curve and the ECE.
RELIABILITY_BINS = 10


def nll_by_temperature(logits: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """``(len(TEMPERATURES),)``: the NLL of ``target`` under ``softmax(logits / T)``, summed
    over the batch, for every grid temperature."""
    scaled = logits.detach().double().unsqueeze(0) / _grid(logits)  # (G, N, C)
    picked = torch.log_softmax(scaled, dim=2).gather(
        2, target.long().view(1, -1, 1).expand(len(TEMPERATURES), -1, 1)
    )
    return (-picked.sum(dim=(1, 2))).cpu().numpy()


def reliability_by_temperature(
    logits: torch.Tensor, target: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Per grid temperature and confidence bin: case counts ``(G, B)`` and summed
    ``[confidence, hit]`` ``(G, B, 2)`` (see the module docstring for both)."""
    probs = torch.softmax(logits.detach().double().unsqueeze(0) / _grid(logits), dim=2)
    target = target.long().view(1, -1).cpu()
    probs = probs.cpu()
    if probs.shape[2] == 2:
        confidence = probs[:, :, 1]
        hit = (target == 1).double().expand_as(confidence)
    else:
        confidence, top = probs.max(dim=2)
        hit = (top == target).double()
    bins = (confidence * RELIABILITY_BINS).long().clamp(0, RELIABILITY_BINS - 1)
    grid = len(TEMPERATURES)
    counts = np.zeros((grid, RELIABILITY_BINS), dtype=np.int64)
    sums = np.zeros((grid, RELIABILITY_BINS, 2), dtype=np.float64)
    rows = np.repeat(np.arange(grid), bins.shape[1])
    flat = bins.reshape(-1).numpy()
    np.add.at(counts, (rows, flat), 1)
    np.add.at(sums[:, :, 0], (rows, flat), confidence.reshape(-1).numpy())  # views of sums
    np.add.at(sums[:, :, 1], (rows, flat), hit.reshape(-1).numpy())
    return counts, sums


def best_temperature(nll: np.ndarray) -> float:
    """The grid temperature of least summed NLL; 1.0 when no case was summed (all zero)."""
    if not np.any(nll > 0):
        return 1.0
    return float(TEMPERATURES[int(np.argmin(nll))])


def temperature_index(temperature: float) -> int:
    """The grid index of ``temperature`` (the nearest grid point in log scale)."""
    return int(np.argmin(np.abs(np.log(TEMPERATURES) - math.log(temperature))))


def expected_calibration_error(counts: np.ndarray, sums: np.ndarray) -> float:
    """ECE of one grid row: ``sum_b n_b / N |hits_b / n_b - confidence_b / n_b|``; NaN
    without cases."""
    total = counts.sum()
    if total == 0:
        return math.nan
    return float(np.abs(sums[:, 1] - sums[:, 0]).sum() / total)


def reliability_curve(counts: np.ndarray, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean confidence and observed hit rate per bin of one grid row (NaN where empty)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        shown = np.where(counts > 0, counts, np.nan)
        return sums[:, 0] / shown, sums[:, 1] / shown


def calibrated_threshold(threshold: float, temperature: float) -> float:
    """The operating threshold on the positive probability after temperature scaling that
    makes exactly the decisions ``threshold`` made before: ``p >= t`` iff the logit
    difference is at least ``logit(t)``, i.e. iff ``sigmoid(d / T) >= sigmoid(logit(t) / T)``."""
    if not math.isfinite(threshold) or threshold <= 0.0 or threshold >= 1.0:
        return threshold
    logit = math.log(threshold / (1.0 - threshold))
    return 1.0 / (1.0 + math.exp(-logit / temperature))


def _grid(logits: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(TEMPERATURES, dtype=torch.float64, device=logits.device).view(-1, 1, 1)
