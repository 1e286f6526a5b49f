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

A failing reply is left out of that round with its reason, which the recorder logs to MLflow;
it never ends the run. A round with fewer than ``min-replies`` valid replies keeps the global
model and is recorded as failed.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.supercore.run import Run

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


def check_replies(
    replies: Iterable[Message],
    reference: ArrayRecord,
    policy: ReplyPolicy,
    node_names: Mapping[int, str],
) -> tuple[list[Message], list[tuple[str, str]]]:
    """``(accepted, [(site, reason), ...])`` for one round's training replies."""
    expected = _expected(reference)
    accepted: list[tuple[Message, float]] = []
    rejected: list[tuple[str, str]] = []
    for reply in replies:
        name = _name(reply, node_names)
        reason, norm, _ = _check_arrival(reply, reference, expected, policy, node_names)
        if reason is None:
            accepted.append((reply, norm))
        else:
            rejected.append((name, reason))
    outliers = _norm_outliers([norm for _, norm in accepted], policy.max_update_norm_ratio)
    for index, reason in outliers.items():
        rejected.append((_name(accepted[index][0], node_names), reason))
    kept = [reply for index, (reply, _) in enumerate(accepted) if index not in outliers]
    return kept, rejected


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


def _expected(reference: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in reference.items()}


def _check_arrival(
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
        return f"error reply ({_last_line(reply.error.reason or '')})", math.nan, 0.0
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


def _norm_outliers(norms: list[float], ratio: float) -> dict[int, str]:
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


def _fp32_bytes(value: np.ndarray) -> int:
    """Bytes of an array sent as float32 (integer arrays as they are)."""
    return value.size * 4 if np.issubdtype(value.dtype, np.floating) else value.nbytes


def _last_line(text: str) -> str:
    """The last non-empty line of an error text (where a traceback names the exception),
    bounded and cleaned: it comes from a site."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return boundary.clean_text(lines[-1]) if lines else "no reason given"


def _name(reply: Message, node_names: Mapping[int, str]) -> str:
    """The site of the node Flower authenticated; never the name the reply claims."""
    node = reply.metadata.src_node_id
    return node_names.get(node, unknown_node(node))


@dataclass
class _Arrival:
    """What the gate kept of one training reply once it arrived."""

    name: str
    reason: str | None  # None: passed checks 1 to 4
    norm: float
    weight: float
    received_bytes: int | None  # None: an error reply


class RunningMean:
    """Sample-weighted sum of one round's accepted updates, folded in as they arrive.

    The server then holds one model's worth of float64 sums however many sites reply, where
    holding every reply grows by a model per site. The norm check (5) and the share cap can
    only run once the round's replies are in, so each folded update is also written to
    ``spill_dir`` and read back only when one is rejected or its weight cut
    (:meth:`rebuild`).
    """

    def __init__(self, reference: Mapping[str, np.ndarray], spill_dir: Path | None) -> None:
        self.sums = {key: np.zeros(value.shape, np.float64) for key, value in reference.items()}
        self.weight = 0.0
        self.spill_dir = spill_dir
        self._spilled: dict[int, Path] = {}

    def add(self, key: int, arrays: ArrayRecord, weight: float) -> None:
        values = {name: arrays[name].numpy() for name in self.sums}
        for name, value in values.items():
            # In float64: a Python float times a float32 array stays float32 in NumPy 2.
            self.sums[name] += np.multiply(value, weight, dtype=np.float64)
        self.weight += weight
        if self.spill_dir is not None:
            path = self.spill_dir / f"{key}.npz"
            with path.open("wb") as out:
                np.savez(out, *values.values())  # positional: keys may not be valid names
            self._spilled[key] = path

    def rebuild(self, entries: Iterable[tuple[int, float]]) -> None:
        """Sum again, from the spilled updates, only ``(key, weight)`` of ``entries``.

        Taking a rejected update back out by subtraction is not exact: one with values of
        1e12 left a 3e-5 trace of itself in the honest mean (found by tests/server/
        test_fuzz.py). Re-reading the kept updates, one at a time, leaves none.
        """
        for total in self.sums.values():
            total[...] = 0.0
        self.weight = 0.0
        for key, weight in entries:
            with np.load(self._spilled[key]) as saved:
                for index, name in enumerate(self.sums):
                    self.sums[name] += np.multiply(saved[f"arr_{index}"], weight, dtype=np.float64)
            self.weight += weight

    def mean(self, reference: Mapping[str, np.ndarray]) -> ArrayRecord:
        """The weighted mean, each array in the global model's dtype."""
        return ArrayRecord(
            {
                name: Array(np.asarray(total / self.weight).astype(reference[name].dtype))
                for name, total in self.sums.items()
            }
        )


@dataclass(frozen=True)
class StoredArray:
    """One array of an update on disk, read a slice at a time into a fresh buffer.

    Not memory-mapped: pages a mapping has touched stay resident while it lives, and at 100
    sites they made FedMedian's server 1.56x and Krum's 2.05x larger than at 10
    (``radfl bench --parts scale``); a slice read with ``np.fromfile`` is freed after use.
    """

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def read(self, start: int, count: int) -> np.ndarray:
        """Elements ``start`` to ``start + count`` of the flattened array."""
        count = max(0, min(count, self.size - start))
        with self.path.open("rb") as file:
            return np.fromfile(
                file, self.dtype, count, offset=self.offset + start * self.dtype.itemsize
            )


class UpdateStore:
    """One round's accepted updates on disk, one ``.npy`` per array.

    Strategies that need every update at once (median, trimmed mean, Krum) then read them a
    slice at a time (:mod:`server.strategies`), and the server holds no model per site.
    """

    def __init__(self, folder: Path, names: Iterable[str]) -> None:
        self.folder = folder
        self.names = list(names)
        self._arrays: dict[int, dict[str, StoredArray]] = {}

    def add(self, key: int, arrays: ArrayRecord) -> None:
        folder = self.folder / str(len(self._arrays))
        folder.mkdir()
        stored = {}
        for index, name in enumerate(self.names):
            value = np.ascontiguousarray(arrays[name].numpy())
            path = folder / f"{index}.npy"
            with path.open("wb") as file:
                np.lib.format.write_array(file, value)
            with path.open("rb") as file:
                np.lib.format.read_magic(file)
                np.lib.format.read_array_header_1_0(file)
                offset = file.tell()
            stored[name] = StoredArray(path, value.shape, value.dtype, offset)
        self._arrays[key] = stored

    def __contains__(self, key: int) -> bool:
        return key in self._arrays

    def load(self, key: int) -> dict[str, StoredArray]:
        """The update stored under ``key``, array by array (nothing read yet)."""
        return self._arrays[key]


class ReplyGate:
    """Wraps a strategy's ``configure_*`` and ``aggregate_*``: sends only to known sites,
    checks each reply before the strategy aggregates, records missing replies, caps each
    site's share, checks the aggregate and enforces the quorum.

    With ``fold`` (strategies whose aggregate is the sample-weighted mean: FedAvg and the
    server optimisers built on it), each reply is checked and folded into a
    :class:`RunningMean` as it arrives (:meth:`receive`, called by :class:`ArrivalGrid`), and
    its weights are dropped; the strategy then aggregates replies that all carry the round's
    mean, which gives that mean. Server memory stays flat in the number of sites. With
    ``on_disk`` (median, trimmed mean, Krum: they need every update at once), each accepted
    update is written to an :class:`UpdateStore` as it arrives and dropped from its reply;
    the strategy reads the store (``strategy.updates``) a slice at a time.
    """

    def __init__(
        self,
        strategy: Any,
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
        self.strategy = strategy
        self.policy = policy
        self.on_traffic = on_traffic
        self.node_names = dict(node_names)
        self.on_reject = on_reject
        self.on_reject_evaluation = on_reject_evaluation or on_reject
        self.on_failed_round = on_failed_round
        self.fold = fold
        #: Hold each accepted update on disk (an :class:`UpdateStore` handed to the strategy
        #: as ``updates``) instead of in its reply.
        self.on_disk = on_disk and not fold
        #: Whether the aggregate lies within the updates (not a server optimiser's step), so
        #: that ``max_aggregate_norm_ratio`` applies.
        self.bound_aggregate = bound_aggregate
        self.round_start: ArrayRecord | None = None
        self.sampled: set[int] = set()
        #: Rounds already done before this ``start`` (a resumed run): Flower counts from 1.
        self.offset = 0
        self._expected: dict[str, np.ndarray] | None = None
        self._arrivals: dict[int, tuple[Message, _Arrival]] = {}
        self._sum: RunningMean | None = None
        self._updates: UpdateStore | None = None
        self._spill: tempfile.TemporaryDirectory[str] | None = None
        self._strangers: set[int] = set()
        self._configure = strategy.configure_train
        self._aggregate = strategy.aggregate_train
        self._configure_evaluate = strategy.configure_evaluate
        self._aggregate_evaluate = strategy.aggregate_evaluate
        strategy.configure_train = self.configure_train
        strategy.aggregate_train = self.aggregate_train
        strategy.configure_evaluate = self.configure_evaluate
        strategy.aggregate_evaluate = self.aggregate_evaluate

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.offset
        messages = self._known_only(
            server_round, self._configure(server_round, arrays, config, grid)
        )
        self._end_round()
        self.round_start = arrays
        self.sampled = {m.metadata.dst_node_id for m in messages}
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._known_only(
            server_round + self.offset,
            self._configure_evaluate(server_round, arrays, config, grid),
        )

    def _known_only(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
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

    def _arrive(self, reply: Message) -> _Arrival:
        known = self._arrivals.get(id(reply))
        if known is not None and known[0] is reply:
            return known[1]
        assert self.round_start is not None, "a training reply before configure_train"
        if self._expected is None:
            self._expected = _expected(self.round_start)
        name = _name(reply, self.node_names)
        received = None if reply.has_error() else compression.payload_bytes(reply.content)
        reason, norm, weight = _check_arrival(
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
        arrival = _Arrival(name, reason, norm, weight, received)
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
        if self.on_disk:
            self.strategy.updates = None
        if self._spill is not None:
            self._spill.cleanup()
            self._spill = None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.offset
        try:
            return self._aggregate_checked(server_round, list(replies))
        finally:
            self._end_round()

    def _aggregate_checked(
        self, server_round: int, replies: list[Message]
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
            model_bytes = sum(_fp32_bytes(self.round_start[k].numpy()) for k in self.round_start)
            self.on_traffic(server_round, received, model_bytes)
        accepted = [(reply, a) for reply, a in arrivals if a.reason is None]
        for _, arrival in arrivals:
            if arrival.reason is not None:
                self.on_reject(server_round, arrival.name, arrival.reason)
        outliers = _norm_outliers([a.norm for _, a in accepted], self.policy.max_update_norm_ratio)
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
            mean = self._sum.mean(_expected(self.round_start))
            if self.policy.fixed_denominator:
                mean = _fixed_denominator_mean(
                    mean, self.round_start, len(kept), self.policy.fixed_denominator
                )
            for reply, _ in kept:
                reply.content[keys.ARRAYS] = mean  # one shared record: their mean is the mean
        if self.on_disk:
            self.strategy.updates = self._updates
        arrays, metrics = self._aggregate(server_round, [reply for reply, _ in kept])
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

    def _cap_shares(self, kept: list[tuple[Message, _Arrival]]) -> bool:
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

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Evaluation replies from known sites with valid states only, each stamped with its
        site's authenticated name; the others are left out with the reason."""
        server_round += self.offset
        kept = []
        for reply in replies:
            name = _name(reply, self.node_names)
            if reply.has_error():  # recorded here, cleaned: Flower would log the raw text
                reason = f"error reply ({_last_line(reply.error.reason or '')})"
                self.on_reject_evaluation(server_round, name, reason)
                continue
            try:
                reply.content = self.check_evaluation(reply)
            except boundary.BadReplyError as exc:
                self.on_reject_evaluation(server_round, name, str(exc))
                continue
            kept.append(reply)
        return self._aggregate_evaluate(server_round - self.offset, kept)  # type: ignore[no-any-return]

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


def with_validation(
    strategy: Any,
    policy: ReplyPolicy,
    node_names: Mapping[int, str],
    on_reject: RejectCallback,
    on_failed_round: FailedRoundCallback,
    on_traffic: TrafficCallback | None = None,
    fold: bool = False,
    on_reject_evaluation: RejectCallback | None = None,
    bound_aggregate: bool = True,
    on_disk: bool = False,
) -> Any:
    """``strategy`` with its replies checked (see :class:`ReplyGate`)."""
    strategy.reply_gate = ReplyGate(
        strategy,
        policy,
        node_names,
        on_reject,
        on_failed_round,
        on_traffic,
        fold,
        on_reject_evaluation,
        bound_aggregate,
        on_disk,
    )
    return strategy


def gate_of(strategy: Any) -> ReplyGate:
    """The reply gate :func:`with_validation` put on ``strategy``."""
    gate = getattr(strategy, "reply_gate", None)
    if not isinstance(gate, ReplyGate):
        raise TypeError("this strategy was not built by server.strategies.build_strategy")
    return gate
