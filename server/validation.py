"""Training replies checked before aggregation, and the round's quorum.

Flower aggregates whatever replies arrive: NaN passes through, ``num-examples`` is trusted as
sent, and a reply whose keys differ from the others ends the whole run. Here each training
reply is checked against the global model the round started from:

1. not an error reply (a crashed site), and arrived within the round's deadline;
   a compressed update (``update-compression``) is decoded against the global model first
   (``common.compression``), and one that cannot be is rejected;
2. exactly the global model's keys, each array with its shape and dtype;
3. every floating-point value finite;
4. ``num-examples`` positive and at most what the site declared when it joined (its training
   split), or ``max-num-examples`` when that is set;
5. the update's L2 norm (``||local - global||``) at most ``max-update-norm-ratio`` times the
   median norm of the round's other checked replies (with three or more of them).

A failing reply is left out of that round with its reason, which the recorder logs to MLflow;
it never ends the run. A round with fewer than ``min-replies`` valid replies keeps the global
model and is recorded as failed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from common import compression
from common import messages as keys
from server.rounds import reply_site_name

#: Called with ``(server_round, site, reason)`` for each reply left out of aggregation.
RejectCallback = Callable[[int, str, str], None]
#: Called with ``(server_round, reason)`` when a round keeps the global model.
FailedRoundCallback = Callable[[int, str], None]
#: Called once per round with ``(server_round, {site: bytes received}, fp32 model bytes)``.
TrafficCallback = Callable[[int, dict[str, int], int], None]


@dataclass
class ReplyPolicy:
    """What a training reply must satisfy."""

    #: Training images each site declared when it joined, by site name.
    declared_examples: Mapping[str, int] = field(default_factory=dict)
    max_num_examples: int = 0  # 0: the declared size only
    max_update_norm_ratio: float = 10.0
    min_replies: int = 1


def check_replies(
    replies: Iterable[Message],
    reference: ArrayRecord,
    policy: ReplyPolicy,
    node_names: Mapping[int, str],
) -> tuple[list[Message], list[tuple[str, str]]]:
    """``(accepted, [(site, reason), ...])`` for one round's training replies."""
    accepted: list[tuple[Message, float]] = []
    rejected: list[tuple[str, str]] = []
    expected = {name: ref.numpy() for name, ref in reference.items()}
    for reply in replies:
        name = _name(reply, node_names)
        reason, norm = _decode(reply, reference)
        if reason is None:
            reason, norm = _check_one(reply, expected, policy, name)
        if reason is None:
            accepted.append((reply, norm))
        else:
            rejected.append((name, reason))
    if len(accepted) >= 3 and policy.max_update_norm_ratio > 0:
        kept = []
        for reply, norm in accepted:
            others = [n for r, n in accepted if r is not reply]
            median = float(np.median(others))
            if median > 0 and norm > policy.max_update_norm_ratio * median:
                rejected.append(
                    (
                        _name(reply, node_names),
                        f"update norm {norm:.4g} exceeds {policy.max_update_norm_ratio:g}x the "
                        f"median of the other replies ({median:.4g})",
                    )
                )
            else:
                kept.append((reply, norm))
        accepted = kept
    return [reply for reply, _ in accepted], rejected


def _decode(reply: Message, reference: ArrayRecord) -> tuple[str | None, float]:
    """Put the full weights of a compressed update in the reply, in place of the update."""
    if reply.has_error() or compression.COMPRESSION not in reply.content:
        return None, math.nan
    try:
        weights = compression.decode(reply.content, reference)
    except (KeyError, TypeError, ValueError) as exc:
        return f"undecodable compressed update: {exc}", math.nan
    reply.content[keys.ARRAYS] = weights
    for name in (compression.COMPRESSION, compression.SCALES):
        if name in reply.content:
            del reply.content[name]
    return None, math.nan


def _check_one(
    reply: Message, expected: Mapping[str, np.ndarray], policy: ReplyPolicy, name: str
) -> tuple[str | None, float]:
    if reply.has_error():
        return f"error reply ({_last_line(reply.error.reason or '')})", math.nan
    try:
        arrays = keys.array_record(reply.content)
        metrics = keys.metric_record(reply.content)
        examples = keys.scalar(metrics, keys.NUM_EXAMPLES)
    except (KeyError, TypeError, ValueError) as exc:
        return f"malformed reply: {exc}", math.nan
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        return (
            f"wrong weights: {len(missing)} missing (e.g. {missing[:1]}), {len(extra)} unexpected "
            f"(e.g. {extra[:1]})",
            math.nan,
        )
    squared = 0.0
    for key, reference in expected.items():
        value = arrays[key].numpy()
        if value.shape != reference.shape or value.dtype != reference.dtype:
            return (
                f"wrong weights: {key} is {value.dtype}{list(value.shape)}, expected "
                f"{reference.dtype}{list(reference.shape)}",
                math.nan,
            )
        if np.issubdtype(value.dtype, np.floating):
            if not np.isfinite(value).all():
                return f"non-finite values in {key}", math.nan
            squared += float(np.sum((value.astype(np.float64) - reference) ** 2))
    if not math.isfinite(examples) or examples <= 0:
        return f"num-examples {examples} is not a positive count", math.nan
    cap = policy.max_num_examples or policy.declared_examples.get(name, 0)
    if cap and examples > cap:
        return (
            f"num-examples {examples:g} exceeds the {cap} training images "
            f"{'allowed' if policy.max_num_examples else 'the site declared when it joined'}",
            math.nan,
        )
    return None, math.sqrt(squared)


def _fp32_bytes(value: np.ndarray) -> int:
    """Bytes of an array sent as float32 (integer arrays as they are)."""
    return value.size * 4 if np.issubdtype(value.dtype, np.floating) else value.nbytes


def _last_line(text: str) -> str:
    """The last non-empty line of an error text (where a traceback names the exception)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no reason given"


def _name(reply: Message, node_names: Mapping[int, str]) -> str:
    if not reply.has_error():
        name = reply_site_name(reply.content)
        if name != "unknown":
            return name
    return node_names.get(reply.metadata.src_node_id, f"node {reply.metadata.src_node_id}")


class ReplyGate:
    """Wraps a strategy's ``configure_train`` and ``aggregate_train``: checks each training
    reply before the strategy aggregates, records missing replies, enforces the quorum."""

    def __init__(
        self,
        strategy: Any,
        policy: ReplyPolicy,
        node_names: Mapping[int, str],
        on_reject: RejectCallback,
        on_failed_round: FailedRoundCallback,
        on_traffic: TrafficCallback | None = None,
    ) -> None:
        self.policy = policy
        self.on_traffic = on_traffic
        self.node_names = dict(node_names)
        self.on_reject = on_reject
        self.on_failed_round = on_failed_round
        self.round_start: ArrayRecord | None = None
        self.sampled: set[int] = set()
        #: Rounds already done before this ``start`` (a resumed run): Flower counts from 1.
        self.offset = 0
        self._configure = strategy.configure_train
        self._aggregate = strategy.aggregate_train
        strategy.configure_train = self.configure_train
        strategy.aggregate_train = self.aggregate_train

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.offset
        messages = list(self._configure(server_round, arrays, config, grid))
        self.round_start = arrays
        self.sampled = {m.metadata.dst_node_id for m in messages}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.offset
        replies = list(replies)
        answered = {r.metadata.src_node_id for r in replies}
        for node in sorted(self.sampled - answered):
            name = self.node_names.get(node, f"node {node}")
            self.on_reject(server_round, name, "no reply within round-timeout-s")
        assert self.round_start is not None, "aggregate_train before configure_train"
        if self.on_traffic is not None:
            received = {
                _name(r, self.node_names): compression.payload_bytes(r.content)
                for r in replies
                if not r.has_error()
            }
            model_bytes = sum(_fp32_bytes(self.round_start[k].numpy()) for k in self.round_start)
            self.on_traffic(server_round, received, model_bytes)
        accepted, rejected = check_replies(replies, self.round_start, self.policy, self.node_names)
        for name, reason in rejected:
            self.on_reject(server_round, name, reason)
        if len(accepted) < self.policy.min_replies:
            self.on_failed_round(
                server_round,
                f"{len(accepted)} valid training replies of {len(self.sampled)}, quorum "
                f"{self.policy.min_replies}: the global model is kept",
            )
            return None, None
        arrays, metrics = self._aggregate(server_round, accepted)
        if arrays is None:
            return arrays, metrics
        # Averaging turns integer scalars (BatchNorm's batch counters) into float vectors of one;
        # the global model keeps the dtypes and shapes it started with, so every round checks
        # replies the same way.
        kept = ArrayRecord()
        for key in arrays:
            value = np.asarray(arrays[key].numpy())
            if key in self.round_start:
                start = self.round_start[key].numpy()
                if value.size == start.size:
                    value = value.astype(start.dtype, copy=False).reshape(start.shape)
            kept[key] = Array(np.array(value, order="C"))  # 0-d stays 0-d
        return kept, metrics


def with_validation(
    strategy: Any,
    policy: ReplyPolicy,
    node_names: Mapping[int, str],
    on_reject: RejectCallback,
    on_failed_round: FailedRoundCallback,
    on_traffic: TrafficCallback | None = None,
) -> Any:
    """``strategy`` with its training replies checked (see :class:`ReplyGate`)."""
    strategy.reply_gate = ReplyGate(
        strategy, policy, node_names, on_reject, on_failed_round, on_traffic
    )
    return strategy


def gate_of(strategy: Any) -> ReplyGate:
    """The reply gate :func:`with_validation` put on ``strategy``."""
    gate = getattr(strategy, "reply_gate", None)
    if not isinstance(gate, ReplyGate):
        raise TypeError("this strategy was not built by server.strategies.build_strategy")
    return gate
