"""Aggregation strategies by name, each a thin layer over Flower's own.

FedAvg (McMahan et al., 2017), FedProx (Li et al., 2020), FedAdam and FedYogi (Reddi et al.,
2021), FedAvgM (Hsu et al., 2019), FedMedian and FedTrimmedAvg (Yin et al., 2018), Krum and
MultiKrum (Blanchard et al., 2017; ``byzantine-sites`` is the number of faulty sites they
tolerate), and FedBN (Li et al., 2021): FedAvg on the server while each site keeps its own
normalisation layers (``client.app``), which matters under scanner shift.

With ``dp-update-noise-multiplier > 0`` the strategy is wrapped in :class:`UpdateDP`, Flower's
``DifferentialPrivacyClientSideFixedClipping`` (DP-FedAvg, McMahan et al., 2018): sites clip
their updates, the reply gate takes the unweighted mean over the sampled sites, and the wrapper
adds Gaussian noise to it.

Every strategy checks training replies before aggregating and enforces the round's quorum
(``server.validation``), leaves left-out sites out of training and keeps its state for
checkpoints: mixins over Flower's classes (``server.strategy_mixins``). The mean-based ones
fold replies into a running mean as they arrive; the median, trimmed mean and (Multi-)Krum read
updates held on disk (:class:`OnDiskAggregate`): the server holds no model per site either way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.config import ServerConfig
from common.errors import RegistryError
from common.messages import array_record, metric_record, scalar
from common.tasks import Task
from server.replies import FailedRoundCallback, RejectCallback, ReplyPolicy, TrafficCallback
from server.strategy_mixins import CheckpointMixin, LeaveOutMixin, ReplyGateMixin
from server.update_store import StoredArray, UpdateStore
from server.validation import ReplyGate, gate_of

MetricsAggregator = Callable[[list[RecordDict], str], MetricRecord]


class RadFLStrategy(CheckpointMixin, ReplyGateMixin, LeaveOutMixin):
    """What every strategy here adds to Flower's (``server.strategy_mixins``): listed first
    in each class's bases, so these run around Flower's steps."""


class AverageBuffersMixin:
    """Server optimisers (FedAdam, FedYogi, FedAvgM) step only floating-point parameters.

    Flower's FedOpt and FedAvgM apply their step to every array, BatchNorm running variances
    and batch counters included, which can make a variance negative (FedAvgM's momentum did
    within two rounds of the default run, and every evaluation after was non-finite). Here
    those buffers take the plain sample-weighted average instead, and every array keeps its
    original dtype.
    """

    weighted_by_key: str
    buffer_keys: frozenset[str] = frozenset()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is None:
            return arrays, metrics
        valid = [m.content for m in replies if not m.has_error()]
        averaged = aggregate_arrayrecords(valid, self.weighted_by_key)
        reference = array_record(valid[0])
        fixed = ArrayRecord()
        for key in arrays:
            dtype = reference[key].numpy().dtype
            source = averaged if key in self.buffer_keys else arrays
            fixed[key] = Array(np.asarray(source[key].numpy()).astype(dtype, copy=False))
        return fixed, metrics


#: Flower's FedOpt: the model it steps from and its first and second moments.
FEDOPT_STATE = ("current_arrays", "m_t", "v_t")


class FedAvg(RadFLStrategy, flwr_strategy.FedAvg):
    """FedAvg (McMahan et al., 2017); FedBN's server too."""


class FedProx(RadFLStrategy, flwr_strategy.FedProx):
    """FedProx (Li et al., 2020): FedAvg on the server; sites add the proximal term."""


class FedAvgM(RadFLStrategy, AverageBuffersMixin, flwr_strategy.FedAvgM):
    """FedAvgM (Hsu et al., 2019) with BatchNorm buffers averaged."""

    state_attributes = ("current_arrays", "momentum_vector")


class FedAdam(RadFLStrategy, AverageBuffersMixin, flwr_strategy.FedAdam):
    """FedAdam with BatchNorm buffers averaged."""

    state_attributes = FEDOPT_STATE


class FedYogi(RadFLStrategy, AverageBuffersMixin, flwr_strategy.FedYogi):
    """FedYogi with BatchNorm buffers averaged."""

    state_attributes = FEDOPT_STATE


#: Coordinates of each update read at once by the on-disk strategies: 2**16 (512 KiB a site
#: in float64, 50 MiB at 100 sites) however large the model.
CHUNK = 2**16


class OnDiskAggregate:
    """Robust aggregates that need every update at once, computed from updates held on disk.

    The reply gate writes each accepted update to an :class:`~server.update_store.UpdateStore`
    as it arrives and hands it over as ``reply_gate.stored``; the aggregate reads ``CHUNK``
    coordinates of every update at a time, so the server holds one model (the result) and a
    slice per site, not a model per site. The results are Flower's: the same median, trimmed
    mean and (Multi-)Krum selection, computed in float64.
    """

    reply_gate: ReplyGate
    weighted_by_key: str
    train_metrics_aggr_fn: MetricsAggregator

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        store: UpdateStore | None = self.reply_gate.stored
        if store is None or not replies:
            return super().aggregate_train(server_round, replies)  # type: ignore[misc]
        models = [store.load(id(reply)) for reply in replies]
        chosen, arrays = self.aggregate_stored(models, replies)
        metrics = self.train_metrics_aggr_fn(
            [replies[i].content for i in chosen], self.weighted_by_key
        )
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}), metrics

    def aggregate_stored(
        self, models: list[dict[str, StoredArray]], replies: list[Message]
    ) -> tuple[list[int], dict[str, np.ndarray]]:
        """``(indices of the updates used, aggregate)``."""
        raise NotImplementedError


def _chunks(models: list[dict[str, StoredArray]], name: str) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, (sites, CHUNK) float64 slice)`` over array ``name`` of every update."""
    size = models[0][name].size
    for start in range(0, size, CHUNK):
        yield start, np.stack([m[name].read(start, CHUNK) for m in models]).astype(np.float64)


def _by_chunk(
    models: list[dict[str, StoredArray]], reduce: Callable[[np.ndarray], np.ndarray]
) -> dict[str, np.ndarray]:
    """``reduce`` over the site axis of every array, a slice at a time."""
    out = {}
    for name, first in models[0].items():
        flat = np.empty(first.size, np.float64)
        for start, block in _chunks(models, name):
            flat[start : start + block.shape[1]] = reduce(block)
        out[name] = flat.reshape(first.shape)
    return out


class FedMedian(RadFLStrategy, OnDiskAggregate, flwr_strategy.FedMedian):
    """Coordinate-wise median (Yin et al., 2018), from updates on disk."""

    def aggregate_stored(
        self, models: list[dict[str, StoredArray]], replies: list[Message]
    ) -> tuple[list[int], dict[str, np.ndarray]]:
        return list(range(len(models))), _by_chunk(models, lambda b: np.median(b, axis=0))


class FedTrimmedAvg(RadFLStrategy, OnDiskAggregate, flwr_strategy.FedTrimmedAvg):
    """Coordinate-wise trimmed mean (Yin et al., 2018), from updates on disk."""

    def aggregate_stored(
        self, models: list[dict[str, StoredArray]], replies: list[Message]
    ) -> tuple[list[int], dict[str, np.ndarray]]:
        beta = self.beta
        return list(range(len(models))), _by_chunk(models, lambda b: trim_mean(b, beta))


class MultiKrum(RadFLStrategy, OnDiskAggregate, flwr_strategy.MultiKrum):
    """MultiKrum (Blanchard et al., 2017) from updates on disk: pairwise distances summed
    slice by slice, then the weighted mean of the ``num_nodes_to_select`` best."""

    def aggregate_stored(
        self, models: list[dict[str, StoredArray]], replies: list[Message]
    ) -> tuple[list[int], dict[str, np.ndarray]]:
        gram = np.zeros((len(models), len(models)))
        for name in models[0]:
            for _, block in _chunks(models, name):
                gram += block @ block.T
        norms = np.diag(gram)
        distances = norms[:, None] + norms[None, :] - 2 * gram
        closest = max(1, len(models) - self.num_malicious_nodes - 2)
        scores = [np.sum(np.sort(row)[1 : closest + 1]) for row in distances]
        chosen = [int(i) for i in np.argsort(scores, kind="stable")[: self.num_nodes_to_select]]
        weights = np.array(
            [scalar(metric_record(replies[i].content), self.weighted_by_key) for i in chosen]
        )
        picked = [models[i] for i in chosen]
        mean = _by_chunk(picked, lambda b: weights @ b / weights.sum())
        return chosen, mean


class Krum(MultiKrum):
    """Krum (Blanchard et al., 2017): MultiKrum selecting one update."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs, num_nodes_to_select=1)


StrategyFactory = Callable[[ServerConfig, dict[str, Any]], RadFLStrategy]

_STRATEGIES: dict[str, StrategyFactory] = {
    "fedavg": lambda cfg, common: FedAvg(**common),
    "fedprox": lambda cfg, common: FedProx(**common, proximal_mu=cfg.proximal_mu),
    "fedadam": lambda cfg, common: FedAdam(**common, eta=cfg.server_learning_rate),
    "fedyogi": lambda cfg, common: FedYogi(**common, eta=cfg.server_learning_rate),
    "fedavgm": lambda cfg, common: FedAvgM(**common, server_learning_rate=1.0, server_momentum=0.9),
    "fedmedian": lambda cfg, common: FedMedian(**common),
    "fedtrimmedavg": lambda cfg, common: FedTrimmedAvg(**common, beta=0.2),
    "krum": lambda cfg, common: Krum(**common, num_malicious_nodes=cfg.byzantine_sites),
    "multikrum": lambda cfg, common: MultiKrum(
        **common,
        num_malicious_nodes=cfg.byzantine_sites,
        num_nodes_to_select=max(1, cfg.min_sites - cfg.byzantine_sites),
    ),
    # The server averages everything; sites keep their own normalisation layers.
    "fedbn": lambda cfg, common: FedAvg(**common),
}


#: Strategies whose aggregate is the sample-weighted mean of the updates (before any server
#: optimiser step): their replies are folded into a running mean as they arrive.
MEAN_AGGREGATES = frozenset({"fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedbn"})
#: Strategies that take a server optimiser's step from the mean: their aggregate can move the
#: model further than any update (momentum, adaptive steps), so only its finiteness is checked.
SERVER_OPTIMISERS = frozenset({"fedadam", "fedyogi", "fedavgm"})


class UpdateDP(flwr_strategy.DifferentialPrivacyClientSideFixedClipping):
    """Update-level DP around a RadFL strategy: Flower's client-side fixed clipping wrapper.

    It sends ``dp-update-clip-norm`` in every training message (each site's
    ``fixedclipping_mod`` clips its update to it before it leaves, ``client.app``) and adds
    Gaussian noise of ``noise_multiplier * clip / sampled_sites`` to the aggregate. The wrapped
    strategy's reply gate (``server.validation``) checks each clipped update as before and takes
    their unweighted mean over ``sampled_sites`` (``ReplyPolicy.fixed_denominator``), the mean
    that noise is calibrated to; the noise is added after the gate's checks. Flower's wrapper
    skips aggregation when any reply is an error (a crashed site): that round keeps the global
    model and is recorded as failed here.

    ``on_round(server_round)`` is called as each round's training is sent (its epsilon is
    logged then).
    """

    def __init__(
        self,
        strategy: flwr_strategy.FedAvg,
        noise_multiplier: float,
        clipping_norm: float,
        sampled_sites: int,
        on_round: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, sampled_sites)
        self.on_round = on_round

    @property
    def reply_gate(self) -> ReplyGate:
        return gate_of(self.strategy)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        if self.on_round is not None:
            self.on_round(server_round + self.reply_gate.offset)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        failed = [r for r in replies if r.has_error()]
        if arrays is None and failed:
            gate = self.reply_gate
            gate.on_failed_round(
                server_round + gate.offset,
                f"{len(failed)} sampled site(s) sent an error reply, and update-level DP "
                "releases no aggregate then (Flower's DP wrapper): the global model is kept",
            )
        return arrays, metrics


def list_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def build_strategy(
    config: ServerConfig,
    *,
    buffer_keys: Iterable[str] = (),
    train_metrics_aggr_fn: MetricsAggregator | None = None,
    evaluate_metrics_aggr_fn: MetricsAggregator | None = None,
    policy: ReplyPolicy | None = None,
    node_names: Mapping[int, str] | None = None,
    on_reject: RejectCallback | None = None,
    on_failed_round: FailedRoundCallback | None = None,
    on_traffic: TrafficCallback | None = None,
    on_reject_evaluation: RejectCallback | None = None,
    sampled_sites: int = 0,
    on_dp_round: Callable[[int], None] | None = None,
) -> flwr_strategy.FedAvg | UpdateDP:
    """The strategy ``config.strategy`` names, configured from the run config, checking
    replies by ``policy`` (default: the run config's, without declared sizes).

    ``buffer_keys`` names the model's non-trainable state (BatchNorm statistics), which server
    optimisers average instead of stepping. With update-level DP
    (``dp-update-noise-multiplier > 0``) it is wrapped in :class:`UpdateDP`, calibrated to
    ``sampled_sites`` sites a round (:func:`sampled_per_round`), which the reply gate's mean
    then divides by; ``on_dp_round`` as in :class:`UpdateDP`.
    """
    try:
        factory = _STRATEGIES[config.strategy]
    except KeyError:
        raise RegistryError(
            f"unknown strategy {config.strategy!r}; known: {', '.join(list_strategies())}"
        ) from None
    common = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_sites,
        "min_evaluate_nodes": config.min_sites,
        "min_available_nodes": config.min_sites,
        "train_metrics_aggr_fn": train_metrics_aggr_fn,
        "evaluate_metrics_aggr_fn": evaluate_metrics_aggr_fn,
    }
    strategy = factory(config, common)
    if isinstance(strategy, AverageBuffersMixin):
        strategy.buffer_keys = frozenset(buffer_keys)
    policy = policy or reply_policy(config)
    if config.update_private:
        if sampled_sites < 1:
            raise ValueError("update-level DP needs the number of sites sampled per round")
        policy = dataclasses.replace(policy, fixed_denominator=sampled_sites)
    strategy.reply_gate = ReplyGate(
        policy,
        node_names or {},
        on_reject or (lambda server_round, site, reason: None),
        on_failed_round or (lambda server_round, reason: None),
        on_traffic,
        fold=config.strategy in MEAN_AGGREGATES,
        on_reject_evaluation=on_reject_evaluation,
        bound_aggregate=config.strategy not in SERVER_OPTIMISERS,
        on_disk=isinstance(strategy, OnDiskAggregate),
    )
    # Every registered class subclasses Flower's FedAvg (or a strategy built on it).
    gated = cast(flwr_strategy.FedAvg, strategy)
    if not config.update_private:
        return gated
    return UpdateDP(
        gated,
        config.dp_update_noise_multiplier,
        config.dp_update_clip_norm,
        sampled_sites,
        on_round=on_dp_round,
    )


def sampled_per_round(config: ServerConfig, nodes: int, training_sites: int) -> int:
    """Training sites Flower's FedAvg sends to each round: ``max(int(nodes * fraction-train),
    min-sites)`` of the ``nodes`` connected, all ``training_sites`` at ``fraction-train = 1``
    (left-out sites are sampled, then dropped; ``ServerConfig`` refuses leave-out with
    ``fraction-train < 1`` under update-level DP)."""
    if config.fraction_train >= 1.0:
        return training_sites
    return min(training_sites, max(int(nodes * config.fraction_train), config.min_sites))


def reply_policy(
    config: ServerConfig,
    declared: Mapping[str, int] | None = None,
    *,
    declared_validation: Mapping[str, int] | None = None,
    task: Task | None = None,
) -> ReplyPolicy:
    """The reply checks the run config asks for; ``declared``: training images by site,
    ``declared_validation``: validation images by site, ``task``: whose metric states
    evaluation replies carry."""
    return ReplyPolicy(
        declared_examples=dict(declared or {}),
        max_num_examples=config.max_num_examples,
        max_update_norm_ratio=config.max_update_norm_ratio,
        min_replies=config.min_replies,
        max_site_share=config.max_site_share,
        max_aggregate_norm_ratio=config.max_aggregate_norm_ratio,
        declared_validation=dict(declared_validation or {}),
        task=task,
    )
