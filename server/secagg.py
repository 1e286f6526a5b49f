"""Training rounds through SecAgg+ (``secure-aggregation = true``): the server sees only the sum.

Bell, Bonawitz, Gascón, Lepoint and Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020; Flower 1.42's implementation
(``flwr.server.workflow.SecAggPlusWorkflow``, served at the sites by
``flwr.client.mod.secaggplus_mod``, see ``client.secagg``).

Everything else in RadFL's ServerApp stays as it is: :class:`SecureAggregationGrid` replaces
only the training ``send_and_receive`` of ``Strategy.start``. For one round's training messages
it runs SecAgg+'s four stages with the sampled sites (each stage waits at most
``secagg-timeout-s`` and never past the round's ``round-timeout-s``):

1. *setup*: each site gets the protocol's parameters and answers with two public keys;
2. *share keys*: each site gets its neighbours' keys and answers with its secrets' Shamir shares,
   encrypted for each neighbour;
3. *collect masked vectors*: each site gets the round's model (RadFL's own training message)
   and its neighbours' shares, trains, and answers with ``w * (local - global)`` quantized and
   masked (``w = num-examples / max-weight``), plus its metrics in the clear;
4. *unmask*: the sites that are left send the shares that remove the masks of the sum (and of
   the sites that dropped out after key sharing).

The server then holds only ``sum_i w_i (local_i - global) / sum_i w_i``, the sample-weighted
mean update. It checks that aggregate (finite; norm at most ``max-aggregate-norm-ratio`` times
the bound each site enforces on its own update, ``secagg-max-update-norm-ratio * ||global||``)
and hands the strategy one reply per contributing site, each carrying the new global model:
their weighted mean is that model, so the strategy, the reply gate (``server.validation``), the
recorder and checkpoints run unchanged. Checks that need one site's update (norm outliers,
shape, finiteness) run at the site before masking (``client.secagg``); options that need
individual updates are refused (:func:`check_options`).

A site lost before key sharing is complete cannot be unmasked (the workflow would ask the others
for shares of its secrets that were never made): the protocol starts again without it. A stage
that leaves a site with fewer live neighbours than the reconstruction threshold ends the round's
protocol: the round fails with the reason, the global model is kept.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import ERROR, INFO
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
)
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    bytes_to_ndarray,
    parameters_to_ndarrays,
)
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import (
    SecAggPlusWorkflow,
    WorkflowState,
)
from flwr.serverapp import Grid

from common import messages as keys
from common.config import LOCAL_NORMALISATION_STRATEGIES, ClientConfig, ServerConfig
from common.errors import ConfigError
from server.validation import ArrivalGrid

#: Strategies that need each site's update, which SecAgg+ hides from the server.
INDIVIDUAL_UPDATE_STRATEGIES = frozenset({"fedmedian", "fedtrimmedavg", "krum", "multikrum"})
#: A folder the server writes what it received under SecAgg to (tests only; unset: nothing).
TRANSCRIPT_ENV = "RADFL_SECAGG_TEST_TRANSCRIPT"
#: Quantization steps of the weighted update (Flower's default is 2**22): the unmasked sum of
#: n sites stays below the modulus 2**32 up to n = 255 sites.
QUANTIZATION_RANGE = 2**24
STAGES = ("setup", "share keys", "collect masked vectors", "unmask")
#: The name a rejection of the round's secure aggregate is recorded under.
SECURE_AGGREGATION = "secure-aggregation"
#: Reject callback: (server_round, site, reason).
RejectCallback = Callable[[int, str, str], None]


class SecureAggregationError(ConfigError):
    """Secure aggregation cannot run with these options."""


def check_options(config: ServerConfig, training: ClientConfig) -> None:
    """Refuse, by key, the options that need individual updates or break the protocol."""
    if not config.secure_aggregation:
        return
    if config.strategy in INDIVIDUAL_UPDATE_STRATEGIES | LOCAL_NORMALISATION_STRATEGIES:
        what = (
            "keeps normalisation layers at each site"
            if config.strategy in LOCAL_NORMALISATION_STRATEGIES
            else "needs each site's update"
        )
        raise SecureAggregationError(
            f"run-config key strategy = {config.strategy!r} {what}, which secure-aggregation "
            "hides from the server; use fedavg, fedprox, fedadam, fedyogi or fedavgm"
        )
    if training.update_compression != "none":
        raise SecureAggregationError(
            f"run-config key update-compression = {training.update_compression!r} cannot be "
            "combined with secure-aggregation (SecAgg+ quantizes the update itself); set it to none"
        )
    if config.dp_update_noise_multiplier > 0:
        raise SecureAggregationError(
            "run-config key dp-update-noise-multiplier > 0 cannot be combined with "
            "secure-aggregation: update-level DP needs the unweighted mean over a fixed number of "
            "sites, SecAgg+ gives the sample-weighted sum; use DP-SGD (dp-noise-multiplier) with it"
        )
    if config.min_sites < 2:  # a sum of one update is that update
        raise SecureAggregationError(
            f"run-config key min-sites must be >= 2 with secure-aggregation, got {config.min_sites}"
        )
    if not 0.0 < config.secagg_num_shares <= 1.0:
        raise SecureAggregationError(
            f"run-config key secagg-num-shares must lie in (0, 1], got {config.secagg_num_shares}"
        )
    if not 0.5 < config.secagg_reconstruction_threshold <= 1.0:  # sites refuse the rest
        raise SecureAggregationError(
            "run-config key secagg-reconstruction-threshold must lie in (0.5, 1] (a strict "
            "majority of the shares, else the server could unmask one site's update), got "
            f"{config.secagg_reconstruction_threshold}"
        )
    for key, value in (
        ("secagg-clipping-range", config.secagg_clipping_range),
        ("secagg-timeout-s", config.secagg_timeout_s),
        ("secagg-max-update-norm-ratio", training.secagg_max_update_norm_ratio),
    ):
        if not value > 0:
            raise SecureAggregationError(f"run-config key {key} must be positive, got {value}")


@dataclass(frozen=True)
class AggregateBound:
    """What the server accepts as the round's unmasked mean update."""

    #: Each site's own bound: ``||local - global|| <= update_norm_ratio * ||global||``.
    update_norm_ratio: float
    #: ``max-aggregate-norm-ratio``: the aggregate may move the model by at most this many
    #: times the sites' bound (0: only finiteness is checked).
    aggregate_norm_ratio: float


def aggregate_fault(
    update: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray], bound: AggregateBound
) -> str | None:
    """Why the unmasked mean ``update`` may not move the model from ``start``, or None.

    A mean of updates each within the sites' bound is within it too, so an honest aggregate
    passes at any ``aggregate_norm_ratio >= 1``.
    """
    squared = 0.0
    for name, value in update.items():
        if not np.isfinite(value).all():
            return f"the secure aggregate has non-finite values in {name}"
        squared += float(np.sum(np.square(value, dtype=np.float64)))
    norm = math.sqrt(squared)
    global_norm = math.sqrt(
        sum(float(np.sum(np.square(start[name], dtype=np.float64))) for name in update)
    )
    limit = bound.aggregate_norm_ratio * bound.update_norm_ratio * global_norm
    if bound.aggregate_norm_ratio > 0 and norm > limit * (1 + 1e-6):
        return (
            f"the secure aggregate moves the model by {norm:.4g}, more than "
            f"max-aggregate-norm-ratio x secagg-max-update-norm-ratio x ||global|| = {limit:.4g}"
        )
    return None


def float_names(arrays: ArrayRecord) -> list[str]:
    """The entries SecAgg+ sums, in the record's order: the floating-point ones (integer
    buffers such as BatchNorm's batch counter stay the server's)."""
    return [name for name in arrays if np.issubdtype(np.dtype(arrays[name].dtype), np.floating)]


class SecureAggregationGrid(ArrivalGrid):
    """The ServerApp's grid with each round's training run through SecAgg+.

    Non-training messages (evaluation, queries) pass as through :class:`ArrivalGrid`. For the
    training messages of a round, :meth:`send_and_receive` runs the protocol on the bare grid
    (its stage replies are not training replies for the reply gate), then hands ``on_reply``
    and the strategy the contributing sites' replies, each carrying the new global model, and
    the error replies of the sites that failed.
    """

    def __init__(
        self,
        grid: Grid,
        on_reply: Callable[[Message], None],
        config: ServerConfig,
        training: ClientConfig,
        *,
        max_weight: float,
        on_reject: RejectCallback,
    ) -> None:
        super().__init__(grid, on_reply)
        self.workflow = SecAggPlusWorkflow(
            num_shares=float(config.secagg_num_shares),
            reconstruction_threshold=float(config.secagg_reconstruction_threshold),
            max_weight=float(max_weight),
            clipping_range=float(config.secagg_clipping_range),
            quantization_range=QUANTIZATION_RANGE,
            timeout=config.secagg_timeout_s,
        )
        self.round_timeout_s = config.round_timeout_s
        self.bound = AggregateBound(
            training.secagg_max_update_norm_ratio, config.max_aggregate_norm_ratio
        )
        self.on_reject = on_reject
        transcript = os.environ.get(TRANSCRIPT_ENV, "")
        self.transcript = Path(transcript) if transcript else None

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return super().send_and_receive(messages, timeout=timeout)
        deadline = time.monotonic() + (timeout if timeout is not None else self.round_timeout_s)
        replies = self._secure_round(messages, deadline)
        for reply in replies:
            self.on_reply(reply)
        return replies

    def _secure_round(self, messages: list[Message], deadline: float) -> list[Message]:
        config = keys.config_record(messages[0].content, keys.CONFIG) or ConfigRecord()
        server_round = int(keys.scalar(config, keys.SERVER_ROUND, 0))
        start = keys.array_record(messages[0].content)
        names = float_names(start)
        live, lost = messages, list[Message]()
        while True:
            stage_grid = _StageGrid(self.grid, deadline)
            context = _legacy_context(self.grid, server_round, live)
            failure, survivors = self._stages(live, stage_grid, context)
            errors = lost + _error_replies(stage_grid)
            if not survivors:
                break
            # A site lost before its secrets were shared cannot be unmasked (Flower's workflow
            # would ask the others for shares it never made): start again without it.
            log(INFO, "[radfl] round %d: secure aggregation restarts without %d site(s) lost "
                "before key sharing", server_round, len(live) - len(survivors))  # fmt: skip
            live, lost = [m for m in live if m.metadata.dst_node_id in survivors], errors
        if failure is not None:
            return self._refuse(server_round, failure, messages, errors)
        mean = context.aggregate
        if mean is None or len(mean) != len(names):
            reason = "secure aggregation produced no aggregate of the model's shape"
            return self._refuse(server_round, reason, messages, errors)
        update = dict(zip(names, mean, strict=True))
        reference = {name: start[name].numpy() for name in names}
        for name, value in update.items():
            if value.shape != reference[name].shape:
                reason = f"the secure aggregate of {name} has shape {value.shape}"
                return self._refuse(server_round, reason, messages, errors)
        if self.transcript is not None:
            _write_transcript(self.transcript, server_round, stage_grid, update)
        fault = aggregate_fault(update, reference, self.bound)
        if fault is not None:
            return self._refuse(
                server_round, f"{fault}: the global model is kept", messages, errors
            )
        model = ArrayRecord()
        for name in start:
            value = start[name].numpy()
            if name in update:
                value = (value.astype(np.float64) + update[name]).astype(value.dtype)
            model[name] = Array(np.array(value, order="C"))
        contributors = []
        for reply in stage_grid.replies[2]:
            if reply.has_error():
                continue
            reply.content = RecordDict(
                {
                    keys.METRICS: keys.metric_record(reply.content),
                    keys.SITE: reply.content[keys.SITE],
                    keys.ARRAYS: model,
                }
            )
            contributors.append(reply)
        log(INFO, "[radfl] round %d: secure aggregate of %d sites", server_round, len(contributors))
        done = {r.metadata.src_node_id for r in contributors}
        return contributors + [e for e in errors if e.metadata.src_node_id not in done]

    def _stages(
        self, messages: list[Message], stage_grid: _StageGrid, context: _Context
    ) -> tuple[str | None, set[int]]:
        """Run SecAgg+'s stages: ``(failure, survivors)``, where ``survivors`` (non-empty
        only when every stage remains to be run again) are the sites left after key sharing
        when some were lost before it."""
        state = WorkflowState()
        steps = (
            self.workflow.setup_stage,
            self.workflow.share_keys_stage,
            self.workflow.collect_masked_vectors_stage,
            self.workflow.unmask_stage,
        )
        for index, step in enumerate(steps):
            stage_grid.stage = index
            if not step(stage_grid, context, state):
                return _failure(index, state, stage_grid), set()
            if index == 0:
                # Stage 3 sends each site RadFL's own training message (model, round config).
                # Flower's strategies share one content between a round's messages: each site
                # gets its own, to which the workflow adds that site's shares.
                state.nid_to_fitins = {
                    m.metadata.dst_node_id: RecordDict(dict(m.content.items())) for m in messages
                }
            alive = set(state.active_node_ids)
            if index == 1 and alive != set(state.sampled_node_ids) and len(alive) >= 2:
                return None, alive
        return None, set()

    def _refuse(
        self, server_round: int, reason: str, messages: list[Message], errors: list[Message]
    ) -> list[Message]:
        """The round without an aggregate: the reason recorded, each site's error reply."""
        log(ERROR, "[radfl] round %d: %s", server_round, reason)
        self.on_reject(server_round, SECURE_AGGREGATION, reason)
        return errors + _left_without_aggregate(messages, errors)


class _StageGrid(ArrivalGrid):
    """The bare grid for the protocol's stages: keeps each stage's replies and never waits
    past the round's deadline."""

    def __init__(self, grid: Grid, deadline: float) -> None:
        super().__init__(grid, lambda reply: None)
        self.deadline = deadline
        self.stage = 0
        self.replies: dict[int, list[Message]] = {index: [] for index in range(len(STAGES))}
        self.sent: dict[int, int] = {}

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        remaining = max(0.0, self.deadline - time.monotonic())
        wait = remaining if timeout is None else min(timeout, remaining)
        self.sent[self.stage] = len(messages)
        replies = list(super().send_and_receive(messages, timeout=wait))
        self.replies[self.stage] = replies
        return replies


class _SelectedNodes(LegacyFedAvg):  # type: ignore[misc]
    """The legacy strategy the workflow asks: the nodes of RadFL's training messages (the
    workflow replaces their instructions by RadFL's messages), and the unmasked mean kept."""

    def __init__(self, grid: Grid, messages: list[Message]) -> None:
        super().__init__()
        self.proxies = [GridClientProxy(m.metadata.dst_node_id, grid, run_id=0) for m in messages]
        self.aggregate: list[np.ndarray] | None = None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(proxy, FitIns(parameters, {})) for proxy in self.proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if results:  # every result carries the unmasked mean (the workflow sets it)
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}


class _Context(LegacyContext):
    aggregate_source: _SelectedNodes

    @property
    def aggregate(self) -> list[np.ndarray] | None:
        return self.aggregate_source.aggregate


def _legacy_context(grid: Grid, server_round: int, messages: list[Message]) -> _Context:
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
            MAIN_PARAMS_RECORD: ArrayRecord(),  # the model travels in RadFL's own messages
        }
    )
    strategy = _SelectedNodes(grid, messages)
    context = _Context(
        Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
        strategy=strategy,
    )
    context.aggregate_source = strategy
    return context


def _failure(stage: int, state: WorkflowState, grid: _StageGrid) -> str:
    sampled = len(state.sampled_node_ids) or grid.sent.get(0, 0)
    if stage == 0 and sampled < 2:
        return f"secure aggregation needs at least 2 sites in a round, {sampled} were sampled"
    alive = len(state.active_node_ids)
    return (
        f"secure aggregation failed at stage '{STAGES[stage]}': {alive} of {sampled} sites "
        f"still take part, and each site needs at least {state.threshold} live neighbours of "
        f"{state.num_shares} (secagg-reconstruction-threshold, secagg-num-shares); the round "
        "fails and the global model is kept"
    )


def _left_without_aggregate(messages: list[Message], errors: list[Message]) -> list[Message]:
    """For each site that did not fail itself in a failed round: an error reply that says so
    (the reply gate would otherwise record it as silent)."""
    failed = {e.metadata.src_node_id for e in errors}
    return [
        Message(
            Error(ErrorCode.UNKNOWN, "the round's secure aggregation failed (see its rejection)"),
            reply_to=m,
        )
        for m in messages
        if m.metadata.dst_node_id not in failed
    ]


def _error_replies(grid: _StageGrid) -> list[Message]:
    """The first error reply of each site that sent one, in any stage."""
    seen: set[int] = set()
    errors = []
    for stage in range(len(STAGES)):
        for reply in grid.replies[stage]:
            node = reply.metadata.src_node_id
            if reply.has_error() and node not in seen:
                seen.add(node)
                errors.append(reply)
    return errors


def _write_transcript(
    folder: Path, server_round: int, grid: _StageGrid, update: Mapping[str, np.ndarray]
) -> None:
    """Tests only: every record the server received from each site in each stage, the masked
    vectors, and the unmasked mean update."""
    folder.mkdir(parents=True, exist_ok=True)
    received: list[dict[str, Any]] = []
    masked: dict[str, np.ndarray] = {}
    for stage, replies in grid.replies.items():
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                received.append({"stage": STAGES[stage], "node": node, "error": True})
                continue
            entry = {
                "stage": STAGES[stage],
                "node": node,
                "records": {
                    name: {
                        "type": type(record).__name__,
                        "arrays": (
                            sum(len(a.data) for a in record.values())
                            if isinstance(record, ArrayRecord)
                            else 0
                        ),
                    }
                    for name, record in reply.content.items()
                },
            }
            if stage == 2:
                site = str(cast(ConfigRecord, reply.content[keys.SITE])[keys.SITE_NAME])
                entry["site"] = site
                configs = reply.content.config_records[RECORD_KEY_CONFIGS]
                vectors = cast(list[bytes], configs[Key.MASKED_PARAMETERS])
                for index, raw in enumerate(vectors):
                    masked[f"{site}/{index}"] = bytes_to_ndarray(raw)
            received.append(entry)
    (folder / f"round-{server_round}.json").write_text(json.dumps(received))
    np.savez(folder / f"round-{server_round}-masked.npz", **masked)  # type: ignore[arg-type]
    np.savez(folder / f"round-{server_round}-aggregate.npz", **update)  # type: ignore[arg-type]
