"""The base of every task's summable metric states (torchmetrics' shape).

A task's states declare named count arrays plus the case count and the summed loss.
``update`` adds a batch to them, a site sends them as a flat record (``to_record``), the server
adds the records of all sites (``add_record``, ``merge``) and calls the same pure ``compute``
(per round) or ``summary`` (values with confidence intervals, for the report). Every number is
a pooled value over all cases, never an average of per-site averages.

Written once here: the record format, the checks a hostile or malformed record meets before it
reaches the sums, and the report hooks a task without them leaves at their defaults (no
threshold, no per-class table, no confusion matrix, no curves).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from common.intervals import MetricWithCI

STATE_PREFIX = "state."


@dataclass(frozen=True)
class MetricInfo:
    """What a server needs to know about one computed metric."""

    name: str
    higher_is_better: bool


@dataclass(frozen=True)
class CurveSet:
    """ROC and reliability curves of one population, for the plots."""

    label: str
    fpr: np.ndarray
    tpr: np.ndarray
    auc: MetricWithCI
    mean_predicted: np.ndarray
    observed: np.ndarray
    counts: np.ndarray
    ece: float


@dataclass(frozen=True)
class TrustSummary:
    """Calibration, selective prediction and attention of one population, for the report.

    ``reliability_*`` are ``(mean confidence, observed rate, counts)`` per confidence bin,
    before (``T = 1``) and after temperature scaling; ``selective`` holds the rows of
    ``common.selective.selective_curve``; ``attention`` is the mean share of Grad-CAM mass
    inside the lesion (``common.attention``), NaN where no case had a lesion mask."""

    label: str
    count: int
    ece_before: float
    ece_after: float
    reliability_before: tuple[np.ndarray, np.ndarray, np.ndarray]
    reliability_after: tuple[np.ndarray, np.ndarray, np.ndarray]
    selective: list[dict[str, Any]]
    attention: MetricWithCI


class SummableStates(ABC):
    """Named count arrays, a case count and a loss sum that add up across sites.

    Subclasses fill ``arrays`` (name to array; integer arrays stay integer) in their
    constructor, add to them in ``update`` and read them in ``compute`` and ``summary``.
    """

    arrays: dict[str, np.ndarray]
    count: int
    loss_sum: float

    # ------------------------------------------------------------- federation
    def to_record(self) -> dict[str, list[float]]:
        """States as flat lists of numbers (a Flower ``MetricRecord`` holds these)."""
        return arrays_to_record(self.arrays, self.count, self.loss_sum)

    def add_record(self, record: Mapping[str, object]) -> None:
        """Add the states of another site, as written by ``to_record``; a record with a
        missing key, a wrong size, a non-finite or negative value raises ``ValueError``
        naming it and adds nothing."""
        incoming, count, loss_sum = arrays_from_record(record, self.arrays)
        for name, values in incoming.items():
            array = self.arrays[name]
            if np.issubdtype(array.dtype, np.integer):
                array += np.rint(values).astype(array.dtype)
            else:
                array += values
        self.count += count
        self.loss_sum += loss_sum

    def merge(self, other: SummableStates) -> Self:
        """Add ``other``'s states to these; returns ``self``."""
        self.add_record(other.to_record())
        return self

    # ---------------------------------------------------------------- compute
    @abstractmethod
    def update(self, prediction: Any, target: Any) -> None:
        """Add a batch of predictions and targets."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The pooled metrics of a round (NaN where no case defines one)."""

    @abstractmethod
    def summary(self, confidence: float, threshold: float) -> dict[str, MetricWithCI]:
        """The report's metrics with ``confidence``-level intervals (NaN bounds where the
        method gives none); ``threshold`` is the operating point, NaN when the task has
        none."""

    # ----------------------------------------------------------- report hooks
    def per_class(self, confidence: float = 0.95) -> list[dict[str, float]]:
        """Rows of the report's per-class table (none by default)."""
        return []

    def confusion_at(self, threshold: float) -> np.ndarray:
        """The confusion matrix at ``threshold`` (empty where it means nothing)."""
        return np.zeros((0, 0), dtype=np.int64)

    def positives(self) -> int | None:
        """Positive cases, for the per-site table (``None``: not a binary finding)."""
        return None

    def curves(self, label: str, confidence: float) -> CurveSet | None:
        """ROC and reliability curves of these states (``None``: no curves)."""
        return None

    def fitted_temperature(self) -> float:
        """The calibration temperature these (validation) states choose (NaN: none)."""
        return math.nan

    def trust(
        self, label: str, temperature: float, threshold: float, confidence: float
    ) -> TrustSummary | None:
        """Calibration at ``temperature``, selective prediction at ``threshold`` and attention
        inside the lesion (``None``: the task has no such states, or none was sent)."""
        return None


def arrays_to_record(
    arrays: Mapping[str, np.ndarray], count: float, loss_sum: float
) -> dict[str, list[float]]:
    """Named count arrays, the case count and the loss sum as a flat record."""
    record = {
        f"{STATE_PREFIX}{name}": array.reshape(-1).astype(float).tolist()
        for name, array in arrays.items()
    }
    record[f"{STATE_PREFIX}loss_sum"] = [float(loss_sum)]
    record[f"{STATE_PREFIX}count"] = [float(count)]
    return record


def arrays_from_record(
    record: Mapping[str, object], like: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], int, float]:
    """Read arrays shaped as ``like``, the case count and the loss sum from a site's record.

    Raises ``ValueError`` naming the problem: a missing key, a wrong size (shape), a
    non-finite or negative count (a malformed or hostile reply never reaches the sums).
    """
    incoming = {}
    for name, array in like.items():
        key = f"{STATE_PREFIX}{name}"
        if key not in record:
            raise ValueError(f"metric states lack key {key!r}")
        values = np.asarray(record[key], dtype=np.float64)
        if values.size != array.size:
            raise ValueError(
                f"metric state {key} has {values.size} values, expected {array.size} "
                f"(shape {array.shape})"
            )
        incoming[name] = values.reshape(array.shape)
    try:
        loss_sum = float(np.asarray(record[f"{STATE_PREFIX}loss_sum"]).reshape(-1)[0])
        count = float(np.asarray(record[f"{STATE_PREFIX}count"]).reshape(-1)[0])
    except KeyError as exc:
        raise ValueError(f"metric states lack key {exc.args[0]!r}") from exc
    everything = np.concatenate([v.reshape(-1) for v in incoming.values()] + [[count]])
    if not np.all(np.isfinite(everything)) or not math.isfinite(loss_sum):
        raise ValueError("metric states must be finite")
    if np.any(everything < 0) or loss_sum < 0:
        raise ValueError("metric states must be non-negative")
    return incoming, int(round(count)), loss_sum


def mean_of_finite(values: list[float]) -> float:
    """The mean of the finite values (NaN when none is)."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan
