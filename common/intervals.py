"""Confidence intervals shared by every task's metric states and the report.

References
----------
E. B. Wilson, "Probable inference, the law of succession, and statistical inference", Journal
of the American Statistical Association 22(158):209-212, 1927.

R. G. Newcombe, "Interval estimation for the difference between independent proportions:
comparison of eleven methods", Statistics in Medicine 17(8):873-890, 1998.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class MetricWithCI:
    """One reported metric with its confidence interval.

    Attributes
    ----------
    name : str
        Metric name, as in :data:`common.metrics.CLASSIFICATION_METRICS` where it exists.
    value : float
        Point estimate (NaN when no case defines it).
    low, high : float
        Interval bounds (NaN when the method gives none).
    method : str
        How the interval was computed: ``"DeLong"``, ``"Wilson"`` or ``"point estimate"``.
    n : int
        Number of cases the estimate rests on (its denominator; all cases for AUC).
    """

    name: str
    value: float
    low: float
    high: float
    method: str
    n: int


def check_alpha(alpha: float) -> float:
    value = float(alpha)
    if not 0.0 < value < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    return value


def z_value(alpha: float) -> float:
    """The two-sided normal quantile z for a 1 - alpha interval (1.96 for alpha 0.05)."""
    return NormalDist().inv_cdf(1.0 - alpha / 2.0)


def wilson_ci(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float, float]:
    """Proportion with Wilson's (1927) score interval.

    Parameters
    ----------
    successes : int
        Number of successes, ``0 <= successes <= n``.
    n : int
        Number of trials.
    alpha : float
        One minus the confidence level.

    Returns
    -------
    p, low, high : float
        ``successes / n`` and the interval bounds; all NaN when ``n == 0``.
    """
    alpha = check_alpha(alpha)
    for name, value in (("successes", successes), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        nan = float("nan")
        return nan, nan, nan
    p = successes / n
    z = z_value(alpha)
    z2_n = z * z / n
    centre = (p + z2_n / 2.0) / (1.0 + z2_n)
    half = z / (1.0 + z2_n) * math.sqrt(p * (1.0 - p) / n + z2_n / (4.0 * n))
    return p, max(0.0, centre - half), min(1.0, centre + half)


def difference_ci(
    a: MetricWithCI, b: MetricWithCI, alpha: float
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
        z = z_value(alpha)
        se_a, se_b = (a.high - a.low) / (2 * z), (b.high - b.low) / (2 * z)
        half = z * math.hypot(se_a, se_b)
        return diff, diff - half, diff + half, label
    if a.method == "Wilson" and b.method == "Wilson":
        low = diff - math.hypot(a.value - a.low, b.high - b.value)
        high = diff + math.hypot(a.high - a.value, b.value - b.low)
        return diff, low, high, "Newcombe hybrid score"
    return diff, nan, nan, "point estimate"
