"""Aggregation strategies by name, each a thin layer over Flower's own.

FedAvg (McMahan et al., 2017), FedProx (Li et al., 2020), FedAdam and FedYogi (Reddi et al.,
2021), FedAvgM (Hsu et al., 2019), FedMedian and FedTrimmedAvg (Yin et al., 2018), Krum and
MultiKrum (Blanchard et al., 2017; ``byzantine-sites`` is the number of faulty sites they
tolerate), and FedBN (Li et al., 2021): FedAvg on the server while each site keeps its own
normalisation layers (``client.app``), which matters under scanner shift.

Every strategy checks training replies before aggregating and enforces the round's quorum
(``server.validation``), leaves left-out sites out of training and keeps its state for
checkpoints: mixins over Flower's classes (``server.strategy_mixins``). The mean-based ones
fold replies into a running mean as they arrive; the median, trimmed mean and (Multi-)Krum read
updates held on disk (:class:`OnDiskAggregate`): the server holds no model per site either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
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
from server.validation import ReplyGate

MetricsAggregator = Callable[[list[RecordDict], str], MetricRecord]


class RadFLStrategy(CheckpointMixin, ReplyGateMixin, LeaveOutMixin):
    """What every strategy here adds to Flower's (``server.strategy_mixins``): listed first
    in each class's bases, so these run around Flower's steps."""


class AverageBuffersMixin:
    """Server optimisers (FedAdam, FedYogi) step only floating-point parameters.

    Flower's FedOpt applies its adaptive step to every array, BatchNorm running variances and
    batch counters included, which can make a variance negative. Here those buffers take the
    plain sample-weighted average instead, and every array keeps its original dtype.
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


class FedAvgM(RadFLStrategy, flwr_strategy.FedAvgM):
    """FedAvgM (Hsu et al., 2019)."""

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
    "fedavgm": lambda cfg, common: FedAvgM(
        **common, server_learning_rate=1.0, server_momentum=0.9
    ),
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
) -> flwr_strategy.FedAvg:
    """The strategy ``config.strategy`` names, configured from the run config, checking
    replies by ``policy`` (default: the run config's, without declared sizes).

    ``buffer_keys`` names the model's non-trainable state (BatchNorm statistics), which server
    optimisers average instead of stepping.
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
    strategy.reply_gate = ReplyGate(
        policy or reply_policy(config),
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
    return cast(flwr_strategy.FedAvg, strategy)


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
