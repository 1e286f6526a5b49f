"""The checks on one round's training replies (``server.validation`` applies them as replies
arrive), and the policy they follow.

Checks 1 to 4 judge one reply against the global model the round started from
(:func:`check_arrival`); check 5 compares the round's update norms (:func:`norm_outliers`);
:func:`capped_weights` is the share cap. The numbering is ``server.validation``'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message

from common import compression
from common import messages as keys
from common.tasks import Task
from server import boundary

#: Called with ``(server_round, site, reason)`` for each reply left out of aggregation.
RejectCallback = Callable[[int, str, str], None]
#: Called with ``(server_round, reason)`` when a round keeps the global model.
FailedRoundCallback = Callable[[int, str], None]
#: Called once per round with ``(server_round, {site: bytes received}, fp32 model bytes)``.
TrafficCallback = Callable[[int, dict[str, int], int], None]


@dataclass
class ReplyPolicy:
    """What a reply must satisfy."""

    #: Training images each site declared when it joined, by site name.
    declared_examples: Mapping[str, int] = field(default_factory=dict)
    max_num_examples: int = 0  # 0: the declared size only
    max_update_norm_ratio: float = 10.0
    min_replies: int = 1
    #: Largest share of a round's total weight one site gets (1: no cap).
    max_site_share: float = 1.0
    #: The aggregate may move the model at most this many times the largest accepted
    #: update's norm (0: only finiteness is checked).
    max_aggregate_norm_ratio: float = 0.0
    #: Validation images each site declared, by site name (evaluation replies).
    declared_validation: Mapping[str, int] = field(default_factory=dict)
    #: The task whose metric states evaluation replies carry (None: states not checked).
    task: Task | None = None
    #: Update-level DP (DP-FedAvg): every accepted update weighs the same and the mean divides
    #: by this many sampled sites, a missing or rejected one counting as no update, so that one
    #: site moves the mean by at most clip / sampled, what the noise is calibrated to (0: off;
    #: mean-folding strategies only).
    fixed_denominator: int = 0


def unknown_node(node: int) -> str:
    """How a node that never described itself is named in logs and MLflow."""
    return f"node-{node}"


def capped_weights(weights: list[float], max_share: float) -> list[float]:
    """``weights`` with the largest cut so that none exceeds ``max_share`` of their sum.

    With ``k`` weights cut to ``c`` and the rest summing to ``r``, each cut share is
    ``c / (k c + r) = max_share``, so ``c = max_share r / (1 - k max_share)``; ``k`` is the
    fewest largest weights for which the next one stays at or below ``c``. When no weighting
    can keep every share at ``max_share`` (fewer than ``1 / max_share`` sites), all weigh
    the same: the smallest largest share there is.
    """
    if max_share >= 1.0 or len(weights) < 2 or sum(weights) <= 0:
        return list(weights)
    if max_share * len(weights) <= 1.0:
        return [1.0] * len(weights)
    order = sorted(weights, reverse=True)
    for cut in range(len(order)):
        rest = sum(order[cut:])
        limit = max_share * rest / (1.0 - cut * max_share)
        if order[cut] <= limit * (1 + 1e-12):
            if cut == 0:
                return list(weights)
            return [min(w, limit) for w in weights]
    return [1.0] * len(weights)  # unreachable: the last cut always fits


def expected_arrays(reference: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in reference.items()}


def check_arrival(
    reply: Message,
    reference: ArrayRecord,
    expected: Mapping[str, np.ndarray],
    policy: ReplyPolicy,
    node_names: Mapping[int, str],
) -> tuple[str | None, float, float]:
    """Checks 1 to 4 on one reply (decoding a compressed update first):
    ``(reason, norm, weight)``. An accepted reply's metrics are replaced by the checked ones
    and its ``site`` record by the authenticated name."""
    if reply.has_error():
        return f"error reply ({last_line(reply.error.reason or '')})", math.nan, 0.0
    node = reply.metadata.src_node_id
    name = node_names.get(node)
    if name is None:
        return f"{unknown_node(node)} was never described or registered", math.nan, 0.0
    cap = policy.max_num_examples or policy.declared_examples.get(name, 0)
    if not cap:
        return "the site declared no training split when it joined", math.nan, 0.0
    try:
        metrics = boundary.check_train_metrics(reply.content, cap)
    except boundary.BadReplyError as exc:
        refused = str(exc)
        if refused.startswith(keys.NUM_EXAMPLES):
            refused += (
                " (max-num-examples)"
                if policy.max_num_examples
                else " (the training images the site declared when it joined)"
            )
        return refused, math.nan, 0.0
    reason, _ = _decode(reply, reference)
    if reason is not None:
        return reason, math.nan, 0.0
    reason, norm = _check_arrays(reply, expected)
    if reason is not None:
        return reason, math.nan, 0.0
    reply.content[keys.METRICS] = metrics
    boundary.stamp(reply.content, name)
    return None, norm, float(metrics[keys.NUM_EXAMPLES])  # type: ignore[arg-type]


def norm_outliers(norms: list[float], ratio: float) -> dict[int, str]:
    """Check 5: by index into ``norms``, the updates too large against the others' median."""
    if len(norms) < 3 or ratio <= 0:
        return {}
    outliers = {}
    for index, norm in enumerate(norms):
        median = float(np.median(norms[:index] + norms[index + 1 :]))
        if median > 0 and norm > ratio * median:
            outliers[index] = (
                f"update norm {norm:.4g} exceeds {ratio:g}x the median of the other replies "
                f"({median:.4g})"
            )
    return outliers


def _decode(reply: Message, reference: ArrayRecord) -> tuple[str | None, float]:
    """Put the full weights of a compressed update in the reply, in place of the update."""
    if reply.has_error() or compression.COMPRESSION not in reply.content:
        return None, math.nan
    try:
        weights = compression.decode(reply.content, reference)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        return f"undecodable compressed update: {boundary.clean_text(exc)}", math.nan
    reply.content[keys.ARRAYS] = weights
    for name in (compression.COMPRESSION, compression.SCALES):
        if name in reply.content:
            del reply.content[name]
    return None, math.nan


def _check_arrays(reply: Message, expected: Mapping[str, np.ndarray]) -> tuple[str | None, float]:
    try:
        arrays = keys.array_record(reply.content)
    except ValueError as exc:
        return f"malformed reply: {exc}", math.nan
    return check_weights(arrays, expected)


def check_weights(
    arrays: ArrayRecord, expected: Mapping[str, np.ndarray]
) -> tuple[str | None, float]:
    """``(reason, norm)``: why ``arrays`` are not a model like ``expected`` (its keys, each
    array's shape and dtype, finite values), or None and the norm of their difference."""
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        return (
            f"wrong weights: {len(missing)} missing (e.g. {missing[:1]}), {len(extra)} unexpected "
            f"(e.g. {boundary.clean_text(extra[:1], 80)})",
            math.nan,
        )
    squared = 0.0
    for key, reference in expected.items():
        array = arrays[key]
        if list(array.shape) != list(reference.shape) or array.dtype != str(reference.dtype):
            # Judged from the header: a huge or odd array is never decoded.
            return (
                f"wrong weights: {key} is {boundary.clean_text(array.dtype, 20)}"
                f"{boundary.clean_text(list(array.shape), 60)}, expected "
                f"{reference.dtype}{list(reference.shape)}",
                math.nan,
            )
        try:
            value = array.numpy()
        except (ValueError, TypeError) as exc:
            return f"undecodable weights {key}: {boundary.clean_text(exc, 100)}", math.nan
        if value.shape != reference.shape or value.dtype != reference.dtype:
            return f"wrong weights: {key} does not decode to its header's shape", math.nan
        if np.issubdtype(value.dtype, np.floating):
            if not np.isfinite(value).all():
                return f"non-finite values in {key}", math.nan
            squared += float(np.sum((value.astype(np.float64) - reference) ** 2))
    norm = math.sqrt(squared)
    if not math.isfinite(norm):
        return f"update norm {norm} is not finite", math.nan
    return None, norm


def fp32_bytes(value: np.ndarray) -> int:
    """Bytes of an array sent as float32 (integer arrays as they are)."""
    return value.size * 4 if np.issubdtype(value.dtype, np.floating) else value.nbytes


def last_line(text: str) -> str:
    """The last non-empty line of an error text (where a traceback names the exception),
    bounded and cleaned: it comes from a site."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return boundary.clean_text(lines[-1]) if lines else "no reason given"


def site_of(reply: Message, node_names: Mapping[int, str]) -> str:
    """The site of the node Flower authenticated; never the name the reply claims."""
    node = reply.metadata.src_node_id
    return node_names.get(node, unknown_node(node))


@dataclass
class Arrival:
    """What the gate kept of one training reply once it arrived."""

    name: str
    reason: str | None  # None: passed checks 1 to 4
    norm: float
    weight: float
    received_bytes: int | None  # None: an error reply
