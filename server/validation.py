"""Training replies checked before aggregation, and the round's quorum.

Flower aggregates whatever replies arrive: NaN passes through, ``num-examples`` is trusted as
sent, and a reply whose keys differ from the others ends the whole run. Here a reply belongs to
the site of the node Flower authenticated (``msg.metadata.src_node_id``), never to the name it
claims, and each training reply is checked against the global model the round started from:

1. from a node described (and, in deployment, registered) before training, not an error reply
   (a crashed site), and arrived within the round's deadline; a compressed update
   (``update-compression``) is decoded against the global model first
   (``common.compression``), and one that cannot be is rejected;
2. every metric known, of its type and in range (``server.boundary``), ``num-examples`` a
   whole number from 1 to what the site declared when it joined (its training split), or
   ``max-num-examples`` when that is set;
3. exactly the global model's keys, each array with its shape and dtype;
4. every floating-point value finite;
5. the update's L2 norm (``||local - global||``) at most ``max-update-norm-ratio`` times the
   median norm of the round's other checked replies (with three or more of them).

Then two caps that do not come from the sites: no site's weight exceeds ``max-site-share`` of
the round's total (weights above it are cut, :func:`capped_weights`), and the aggregate must be
finite and move the model by at most ``max-aggregate-norm-ratio`` times the largest accepted
update (strategies whose aggregate lies within the updates; server optimisers only the
finiteness), else the round fails and the global model is kept.

Evaluation replies go through the same gate: from a known node, metric states checked
(``server.boundary.check_evaluate``), stamped with the authenticated name.

The checks themselves are in ``server.replies``, where accepted updates wait in
``server.update_store``; strategies apply the gate by subclassing
(``server.strategy_mixins.ReplyGateMixin``).

A failing reply is left out of that round with its reason, which the recorder logs to MLflow;
it never ends the run. A round with fewer than ``min-replies`` valid replies keeps the global
model and is recorded as failed.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from common import compression
from common import messages as keys
from server import boundary
from server.replies import (
    Arrival,
    FailedRoundCallback,
    RejectCallback,
    ReplyPolicy,
    TrafficCallback,
    capped_weights,
    check_arrival,
    check_weights,
    expected_arrays,
    fp32_bytes,
    last_line,
    norm_outliers,
    site_of,
    unknown_node,
)
from server.update_store import RunningMean, UpdateStore

__all__ = [  # what other modules import from here
    "ArrivalGrid",
    "ReplyGate",
    "ReplyPolicy",
    "check_weights",
    "gate_of",
]

#: A strategy's own ``aggregate_train``.
Aggregate = Callable[[int, list[Message]], tuple[ArrayRecord | None, MetricRecord | None]]


class ReplyGate:
    """One run's reply checks and their per-round state, which
    :class:`server.strategy_mixins.ReplyGateMixin` applies around a strategy's
    ``configure_*`` and ``aggregate_*``: sends only to known sites, checks each reply before
    the strategy aggregates, records missing replies, caps each site's share, checks the
    aggregate and enforces the quorum.

    With ``fold`` (strategies whose aggregate is the sample-weighted mean: FedAvg and the
    server optimisers built on it), each reply is checked and folded into a
    :class:`RunningMean` as it arrives (:meth:`receive`, called by :class:`ArrivalGrid`), and
    its weights are dropped; the strategy then aggregates replies that all carry the round's
    mean, which gives that mean. Server memory stays flat in the number of sites. With
    ``on_disk`` (median, trimmed mean, Krum: they need every update at once), each accepted
    update is written to an :class:`UpdateStore` as it arrives and dropped from its reply;
    the strategy reads the store (:attr:`stored`) a slice at a time.
    """

    def __init__(
        self,
        policy: ReplyPolicy,
        node_names: Mapping[int, str],
        on_reject: RejectCallback,
        on_failed_round: FailedRoundCallback,
        on_traffic: TrafficCallback | None = None,
        fold: bool = False,
        on_reject_evaluation: RejectCallback | None = None,
        bound_aggregate: bool = True,
        on_disk: bool = False,
    ) -> None:
        self.policy = policy
        self.on_traffic = on_traffic
        self.node_names = dict(node_names)
        self.on_reject = on_reject
        self.on_reject_evaluation = on_reject_evaluation or on_reject
        self.on_failed_round = on_failed_round
        self.fold = fold
        #: Hold each accepted update on disk (an :class:`UpdateStore`, :attr:`stored` while
        #: the strategy aggregates) instead of in its reply.
        self.on_disk = on_disk and not fold
        #: Whether the aggregate lies within the updates (not a server optimiser's step), so
        #: that ``max_aggregate_norm_ratio`` applies.
        self.bound_aggregate = bound_aggregate
        self.round_start: ArrayRecord | None = None
        self.sampled: set[int] = set()
        #: Rounds already done before this ``start`` (a resumed run): Flower counts from 1.
        self.offset = 0
        self._expected: dict[str, np.ndarray] | None = None
        self._arrivals: dict[int, tuple[Message, Arrival]] = {}
        self._sum: RunningMean | None = None
        self._updates: UpdateStore | None = None
        self._spill: tempfile.TemporaryDirectory[str] | None = None
        self._strangers: set[int] = set()
        #: The round's update store while the strategy aggregates (``on_disk``), else None.
        self.stored: UpdateStore | None = None

    def start_round(self, arrays: ArrayRecord, messages: list[Message]) -> None:
        """A training round begins from ``arrays``, sent as ``messages``."""
        self._end_round()
        self.round_start = arrays
        self.sampled = {m.metadata.dst_node_id for m in messages}

    def known_only(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        """Messages for sites described before training; a node Flower lists that never
        described itself (or is not registered) gets none, with the reason logged once."""
        kept = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self.node_names:
                kept.append(message)
            elif node not in self._strangers:
                self._strangers.add(node)
                self.on_reject(
                    server_round,
                    unknown_node(node),
                    "node was never described or registered: left out of the run",
                )
        return kept

    def receive(self, reply: Message) -> None:
        """Check (and with ``fold``, fold in) a training reply the moment it arrives."""
        if self.round_start is not None and reply.metadata.message_type == MessageType.TRAIN:
            self._arrive(reply)

    def _arrive(self, reply: Message) -> Arrival:
        known = self._arrivals.get(id(reply))
        if known is not None and known[0] is reply:
            return known[1]
        assert self.round_start is not None, "a training reply before configure_train"
        if self._expected is None:
            self._expected = expected_arrays(self.round_start)
        name = site_of(reply, self.node_names)
        received = None if reply.has_error() else compression.payload_bytes(reply.content)
        reason, norm, weight = check_arrival(
            reply, self.round_start, self._expected, self.policy, self.node_names
        )
        if self.policy.fixed_denominator:
            weight = 1.0
        if reason is None and self.fold:
            self._running_sum().add(id(reply), keys.array_record(reply.content), weight)
        elif reason is None and self.on_disk:
            self._store().add(id(reply), keys.array_record(reply.content))
        if (self.fold or self.on_disk) and not reply.has_error() and keys.ARRAYS in reply.content:
            del reply.content[keys.ARRAYS]
        arrival = Arrival(name, reason, norm, weight, received)
        self._arrivals[id(reply)] = (reply, arrival)
        return arrival

    def _running_sum(self) -> RunningMean:
        if self._sum is None:
            assert self._expected is not None
            spill = None
            if self.policy.max_update_norm_ratio > 0 or self.policy.max_site_share < 1:
                self._spill = tempfile.TemporaryDirectory(prefix="radfl-round-")
                spill = Path(self._spill.name)
            self._sum = RunningMean(self._expected, spill)
        return self._sum

    def _store(self) -> UpdateStore:
        if self._updates is None:
            assert self._expected is not None
            self._spill = tempfile.TemporaryDirectory(prefix="radfl-round-")
            self._updates = UpdateStore(Path(self._spill.name), self._expected)
        return self._updates

    def _end_round(self) -> None:
        self._arrivals, self._sum, self._expected = {}, None, None
        self._updates = None
        self.stored = None
        if self._spill is not None:
            self._spill.cleanup()
            self._spill = None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message], aggregate: Aggregate
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The checked aggregate of ``replies`` (``server_round`` counted across a resumed run),
        computed by ``aggregate`` (the strategy's own) from the replies that pass; ``(None,
        None)`` when the round fails and the global model is kept."""
        try:
            return self._aggregate_checked(server_round, list(replies), aggregate)
        finally:
            self._end_round()

    def _aggregate_checked(
        self, server_round: int, replies: list[Message], aggregate: Aggregate
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        answered = {r.metadata.src_node_id for r in replies}
        for node in sorted(self.sampled - answered):
            name = self.node_names.get(node, unknown_node(node))
            self.on_reject(server_round, name, "no reply within round-timeout-s")
        assert self.round_start is not None, "aggregate_train before configure_train"
        arrivals = [(reply, self._arrive(reply)) for reply in replies]
        if self.on_traffic is not None:
            received = {
                a.name: a.received_bytes for _, a in arrivals if a.received_bytes is not None
            }
            model_bytes = sum(fp32_bytes(self.round_start[k].numpy()) for k in self.round_start)
            self.on_traffic(server_round, received, model_bytes)
        accepted = [(reply, a) for reply, a in arrivals if a.reason is None]
        for _, arrival in arrivals:
            if arrival.reason is not None:
                self.on_reject(server_round, arrival.name, arrival.reason)
        outliers = norm_outliers([a.norm for _, a in accepted], self.policy.max_update_norm_ratio)
        for index, reason in outliers.items():
            self.on_reject(server_round, accepted[index][1].name, reason)
        # In site order, not arrival order: float sums depend on their order, and a run should
        # give the same model whichever site happened to answer first.
        kept = [
            (reply, arrival)
            for index, (reply, arrival) in sorted(
                enumerate(accepted), key=lambda item: item[1][1].name
            )
            if index not in outliers
        ]
        if len(kept) < self.policy.min_replies:
            self.on_failed_round(
                server_round,
                f"{len(kept)} valid training replies of {len(self.sampled)}, quorum "
                f"{self.policy.min_replies}: the global model is kept",
            )
            return None, None
        capped = self._cap_shares(kept)
        if self._sum is not None and (outliers or capped):
            self._sum.rebuild((id(reply), arrival.weight) for reply, arrival in kept)
        if self._sum is not None:
            mean = self._sum.mean(expected_arrays(self.round_start))
            if self.policy.fixed_denominator:
                mean = _fixed_denominator_mean(
                    mean, self.round_start, len(kept), self.policy.fixed_denominator
                )
            for reply, _ in kept:
                reply.content[keys.ARRAYS] = mean  # one shared record: their mean is the mean
        if self.on_disk:
            self.stored = self._updates
        arrays, metrics = aggregate(server_round, [reply for reply, _ in kept])
        if arrays is None:
            return arrays, metrics
        # Averaging turns integer scalars (BatchNorm's batch counters) into float vectors of one;
        # the global model keeps the dtypes and shapes it started with, so every round checks
        # replies the same way.
        result = ArrayRecord()
        for key in arrays:
            value = np.asarray(arrays[key].numpy())
            if key in self.round_start:
                start = self.round_start[key].numpy()
                if value.size == start.size:
                    value = value.astype(start.dtype, copy=False).reshape(start.shape)
            result[key] = Array(np.array(value, order="C"))  # 0-d stays 0-d
        fault = self._aggregate_fault(result, max(a.norm for _, a in kept))
        if fault is not None:
            self.on_failed_round(server_round, f"{fault}: the global model is kept")
            return None, None
        return result, metrics

    def _cap_shares(self, kept: list[tuple[Message, Arrival]]) -> bool:
        """Cut the weights above ``max_site_share`` of the round's total, in each reply's
        ``num-examples`` (which Flower's strategies weigh by); whether any was cut."""
        weights = [arrival.weight for _, arrival in kept]
        capped = capped_weights(weights, self.policy.max_site_share)
        for (reply, arrival), new in zip(kept, capped, strict=True):
            if new == arrival.weight:
                continue
            metrics = dict(keys.metric_record(reply.content))
            metrics[keys.NUM_EXAMPLES] = new
            reply.content[keys.METRICS] = MetricRecord(metrics)
            arrival.weight = new
        return capped != weights

    def _aggregate_fault(self, result: ArrayRecord, largest_update: float) -> str | None:
        """Why the aggregate may not replace the global model, or None."""
        assert self.round_start is not None
        squared = 0.0
        for key in result:
            value = result[key].numpy()
            if not np.issubdtype(value.dtype, np.floating):
                continue
            if not np.isfinite(value).all():
                return f"the aggregate has non-finite values in {key}"
            if key in self.round_start:
                start = self.round_start[key].numpy().astype(np.float64)
                squared += float(np.sum((value.astype(np.float64) - start) ** 2))
        ratio = self.policy.max_aggregate_norm_ratio
        norm = math.sqrt(squared)
        if self.bound_aggregate and ratio > 0 and norm > ratio * largest_update * (1 + 1e-6):
            return (
                f"the aggregate moves the model by {norm:.4g}, more than {ratio:g}x the largest "
                f"accepted update ({largest_update:.4g})"
            )
        return None

    def evaluation_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Evaluation replies from known sites with valid states only, each stamped with its
        site's authenticated name; the others are left out with the reason."""
        kept = []
        for reply in replies:
            name = site_of(reply, self.node_names)
            if reply.has_error():  # recorded here, cleaned: Flower would log the raw text
                reason = f"error reply ({last_line(reply.error.reason or '')})"
                self.on_reject_evaluation(server_round, name, reason)
                continue
            try:
                reply.content = self.check_evaluation(reply)
            except boundary.BadReplyError as exc:
                self.on_reject_evaluation(server_round, name, str(exc))
                continue
            kept.append(reply)
        return kept

    def check_evaluation(self, reply: Message) -> RecordDict:
        """An ``evaluate`` reply's content, checked and stamped (or ``BadReplyError``)."""
        node = reply.metadata.src_node_id
        name = self.node_names.get(node)
        if name is None:
            raise boundary.BadReplyError(f"{unknown_node(node)} was never described or registered")
        if self.policy.task is None:
            metrics = keys.metric_record(reply.content)
        else:
            declared = self.policy.declared_validation.get(name, 0)
            metrics = boundary.check_evaluate(reply.content, self.policy.task, declared)
        content = RecordDict({keys.METRICS: metrics})
        boundary.stamp(content, name)
        return content


class ArrivalGrid(Grid):
    """The ServerApp's grid, handing each reply to ``on_reply`` the moment it is pulled (so a
    :class:`ReplyGate` can fold training replies in as they arrive). Otherwise Flower's own
    ``send_and_receive``: push everything, pull until all replied or ``timeout``."""

    def __init__(
        self, grid: Grid, on_reply: Callable[[Message], None], pull_interval_s: float = 0.1
    ) -> None:
        self.grid = grid
        self.on_reply = on_reply
        self.pull_interval_s = pull_interval_s

    def __getattr__(self, name: str) -> Any:  # what a particular grid adds (get_nodes)
        return getattr(self.grid, name)

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        waiting = set(self.grid.push_messages(messages))
        deadline = time.monotonic() + (timeout or 0.0)
        replies: list[Message] = []
        while waiting and (timeout is None or time.monotonic() < deadline):
            for reply in self.grid.pull_messages(waiting):
                waiting.discard(reply.metadata.reply_to_message_id)
                self.on_reply(reply)
                replies.append(reply)
            if waiting:
                time.sleep(self.pull_interval_s)
        return replies


def gate_of(strategy: Any) -> ReplyGate:
    """The reply gate of ``strategy`` (built by ``server.strategies.build_strategy``), or of
    the strategy a wrapper (Flower's differential-privacy strategies) holds as ``strategy``."""
    while not hasattr(strategy, "reply_gate") and hasattr(strategy, "strategy"):
        strategy = strategy.strategy
    gate = getattr(strategy, "reply_gate", None)
    if not isinstance(gate, ReplyGate):
        raise TypeError("this strategy was not built by server.strategies.build_strategy")
    return gate


def _fixed_denominator_mean(
    mean: ArrayRecord, start: ArrayRecord, kept: int, denominator: int
) -> ArrayRecord:
    """``start + (mean - start) * kept / denominator``: the sum of the kept updates over the
    fixed number of sampled sites (floating-point arrays; others as averaged)."""
    scale = kept / denominator
    out = ArrayRecord()
    for key in mean:
        value = mean[key].numpy()
        if np.issubdtype(value.dtype, np.floating) and key in start:
            origin = start[key].numpy().astype(np.float64)
            value = (origin + (value.astype(np.float64) - origin) * scale).astype(value.dtype)
        out[key] = Array(np.ascontiguousarray(value))
    return out
