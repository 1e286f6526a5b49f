"""SecAgg+ on the server (server/secagg.py): options refused by key, the aggregate's checks,
and each stage's wait bounded by the round's deadline. The protocol itself runs in
tests/simulations/test_secagg_e2e.py."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import messages as keys
from common.config import ClientConfig, ServerConfig, default_run_config, from_run_config
from common.errors import ConfigError
from server import secagg


def _configs(**overrides: Any) -> tuple[ServerConfig, ClientConfig]:
    run_config = {**default_run_config(), "secure-aggregation": True, **overrides}
    return from_run_config(ServerConfig, run_config), from_run_config(ClientConfig, run_config)


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "fedbn"])
def test_strategies_that_need_each_update_are_refused_by_key(strategy):
    with pytest.raises(ConfigError, match=f"strategy = '{strategy}' .* secure-aggregation"):
        secagg.check_options(*_configs(strategy=strategy))


def test_update_level_dp_is_refused_by_key():
    with pytest.raises(secagg.SecureAggregationError, match="dp-update-noise-multiplier"):
        secagg.check_options(*_configs(**{"dp-update-noise-multiplier": 1.0}))


def test_update_compression_is_refused_by_key():
    with pytest.raises(ConfigError, match="update-compression = 'int8' cannot be combined"):
        secagg.check_options(*_configs(**{"update-compression": "int8"}))


@pytest.mark.parametrize(
    ("key", "value"),
    [("secagg-num-shares", 0.0), ("secagg-reconstruction-threshold", 1.5),
     ("secagg-reconstruction-threshold", 0.5),
     ("secagg-clipping-range", 0.0), ("secagg-max-update-norm-ratio", -1.0),
     ("min-sites", 1)],
)  # fmt: skip
def test_bad_secagg_keys_are_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=f"run-config key {key} must"):
        secagg.check_options(*_configs(**{key: value}))


def test_fedavg_with_secure_aggregation_and_krum_without_it_are_accepted():
    secagg.check_options(*_configs(strategy="fedprox"))
    secagg.check_options(*_configs(strategy="krum", **{"secure-aggregation": False}))


START = {"w": np.full((2, 2), 3.0), "b": np.zeros(4)}  # ||global|| = 6
BOUND = secagg.AggregateBound(update_norm_ratio=0.5, aggregate_norm_ratio=1.0)


def test_an_aggregate_within_the_sites_bound_passes():
    update = {"w": np.full((2, 2), 1.0), "b": np.full(4, 1.0)}  # norm 2.83 <= 0.5 * 6
    assert secagg.aggregate_fault(update, START, BOUND) is None


def test_a_nan_aggregate_is_refused():
    update = {"w": np.full((2, 2), np.nan), "b": np.zeros(4)}
    assert secagg.aggregate_fault(update, START, BOUND) == (
        "the secure aggregate has non-finite values in w"
    )


def test_an_aggregate_beyond_the_sites_bound_is_refused_unless_the_ratio_is_off():
    update = {"w": np.full((2, 2), 2.0), "b": np.zeros(4)}  # norm 4 > 0.5 * 6
    fault = secagg.aggregate_fault(update, START, BOUND)
    assert fault is not None and fault.startswith("the secure aggregate moves the model by 4,")
    off = secagg.AggregateBound(update_norm_ratio=0.5, aggregate_norm_ratio=0.0)
    assert secagg.aggregate_fault(update, START, off) is None


def _training_message(node: int) -> Message:
    content = RecordDict(
        {
            keys.ARRAYS: ArrayRecord(
                {
                    "w": Array(np.ones((2, 2), np.float32)),
                    "n": Array(np.array(7, np.int64)),
                }
            ),
            keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1}),
        }
    )
    return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)


def _grid(rejected: list[tuple[int, str, str]]) -> secagg.SecureAggregationGrid:
    server, training = _configs()
    return secagg.SecureAggregationGrid(
        cast(Grid, object()),  # the stages are replaced in each test: nothing is sent
        lambda reply: None,
        server,
        training,
        max_weight=10.0,
        on_reject=lambda *rejection: rejected.append(rejection),
    )


def _passes(*args: Any) -> bool:
    return True


def test_the_grid_refuses_a_nan_aggregate_by_message_and_keeps_the_model(monkeypatch):
    rejected: list[tuple[int, str, str]] = []
    grid = _grid(rejected)

    def unmask(stage_grid: Any, context: Any, state: Any) -> bool:
        context.aggregate_source.aggregate = [np.full((2, 2), np.nan)]
        return True

    for name in ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage"):
        monkeypatch.setattr(grid.workflow, name, _passes)
    monkeypatch.setattr(grid.workflow, "unmask_stage", unmask)
    replies = list(grid.send_and_receive([_training_message(5), _training_message(6)], timeout=5))
    reason = "the secure aggregate has non-finite values in w: the global model is kept"
    assert rejected == [(1, "secure-aggregation", reason)]
    # No model reaches the strategy: each site's reply is an error that says why.
    assert [r.metadata.src_node_id for r in replies] == [5, 6]
    assert all(r.error.reason.startswith("the round's secure aggregation failed") for r in replies)


def test_a_site_lost_before_key_sharing_restarts_the_protocol_without_it(monkeypatch):
    rejected: list[tuple[int, str, str]] = []
    grid = _grid(rejected)
    attempts: list[list[int]] = []

    def setup(stage_grid: Any, context: Any, state: Any) -> bool:
        nodes = [proxy.node_id for proxy in context.strategy.proxies]
        attempts.append(nodes)
        state.sampled_node_ids = set(nodes)
        state.active_node_ids = set(nodes)
        return True

    def share_keys(stage_grid: Any, context: Any, state: Any) -> bool:
        state.active_node_ids = state.active_node_ids - {7}  # site 7 never shares its keys
        return True

    def unmask(stage_grid: Any, context: Any, state: Any) -> bool:
        context.aggregate_source.aggregate = [np.zeros((2, 2))]
        return True

    monkeypatch.setattr(grid.workflow, "setup_stage", setup)
    monkeypatch.setattr(grid.workflow, "share_keys_stage", share_keys)
    monkeypatch.setattr(grid.workflow, "collect_masked_vectors_stage", _passes)
    monkeypatch.setattr(grid.workflow, "unmask_stage", unmask)
    grid.send_and_receive([_training_message(n) for n in (5, 6, 7)], timeout=5)
    assert attempts == [[5, 6, 7], [5, 6]]
    assert rejected == []


class _SilentGrid:
    """Accepts messages; no site ever answers."""

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        return [str(index) for index, _ in enumerate(messages)]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return []


def test_a_stage_never_waits_past_the_rounds_deadline():
    stage_grid = secagg._StageGrid(cast(Grid, _SilentGrid()), time.monotonic() + 0.3)
    started = time.monotonic()
    assert list(stage_grid.send_and_receive([_training_message(5)], timeout=600)) == []
    assert time.monotonic() - started < 1.0
