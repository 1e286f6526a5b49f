"""Update-level (site-level) DP: the run configs it refuses, its accountant, and how Flower's
wrapper composes with the reply gate (the unweighted mean over a fixed number of sites)."""

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.config import (
    UPDATE_DP_STRATEGIES,
    ClientConfig,
    ServerConfig,
    default_run_config,
    from_run_config,
)
from common.errors import ConfigError
from common.privacy import UpdateAccountant
from server.strategies import (
    UpdateDP,
    build_strategy,
    list_strategies,
    reply_policy,
    sampled_per_round,
)
from server.validation import gate_of
from tests.common.test_privacy import _epsilon

NAMES = {1: "site-1", 2: "site-2", 3: "site-3"}
DP = {"dp-update-noise-multiplier": 1.0, "dp-update-clip-norm": 1.0}


def _server(**overrides) -> ServerConfig:
    return from_run_config(ServerConfig, {**default_run_config(), **overrides})


def _client(**overrides) -> ClientConfig:
    return from_run_config(ClientConfig, {**default_run_config(), **overrides})


# -- refusals, by key --------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in list_strategies() if n not in UPDATE_DP_STRATEGIES])
def test_update_dp_refuses_server_optimisers_and_robust_aggregates_by_key(name):
    with pytest.raises(ConfigError, match=f"run-config key strategy = '{name}' cannot be"):
        _server(strategy=name, **DP)


@pytest.mark.parametrize("name", UPDATE_DP_STRATEGIES)
def test_update_dp_accepts_the_mean_strategies(name):
    assert _server(strategy=name, **DP).update_private


def test_update_dp_refuses_cross_site_models_by_key():
    with pytest.raises(ConfigError, match="run-config key cross-site = true cannot be combined"):
        _server(**{"cross-site": True}, **DP)


def test_update_dp_refuses_leave_out_with_partial_sampling_by_key():
    with pytest.raises(ConfigError, match="run-config key leave-out cannot be combined"):
        _server(**{"leave-out": "site-2", "fraction-train": 0.5}, **DP)
    assert _server(**{"leave-out": "site-2"}, **DP).update_private  # every site a round: fine


@pytest.mark.parametrize("method", ["fp16", "int8"])
def test_update_dp_refuses_compressed_updates_by_key(method):
    with pytest.raises(ConfigError, match=f"update-compression = '{method}' cannot be combined"):
        _client(**{"update-compression": method}, **DP)


def test_an_update_dp_budget_without_noise_and_bad_values_are_refused_by_key():
    with pytest.raises(ConfigError, match="dp-update-epsilon is a budget for update-level DP"):
        _server(**{"dp-update-epsilon": 3.0})
    with pytest.raises(ConfigError, match="dp-update-clip-norm must be positive"):
        _server(**{**DP, "dp-update-clip-norm": 0.0})
    with pytest.raises(ConfigError, match="dp-update-noise-multiplier and dp-update-epsilon"):
        _server(**{"dp-update-noise-multiplier": -1.0})


def test_update_dp_trains_the_group_norm_network_on_both_sides():
    assert _server(**DP).private_network and _client(**DP).private_network
    assert not _client(**DP).private  # no DP-SGD: batches are not Poisson-sampled


# -- the accountant ----------------------------------------------------------------------------
@pytest.mark.parametrize(("sigma", "q", "rounds"), [(1.0, 1.0, 20), (0.8, 1.0, 3), (1.5, 0.3, 50)])
def test_the_site_level_epsilon_matches_an_independent_computation_to_one_percent(sigma, q, rounds):
    accountant = UpdateAccountant(sigma, q, 1e-5)
    assert accountant.epsilon(rounds) == pytest.approx(
        _epsilon([(sigma, q, rounds)], 1e-5), rel=0.01
    )


def test_with_every_site_every_round_epsilon_is_the_gaussian_mechanism_in_closed_form():
    # q = 1: RDP of T rounds is T alpha / (2 sigma^2); epsilon by Balle et al. (2020, Thm 21).
    sigma, rounds, delta = 2.0, 10, 1e-5
    orders = np.arange(2, 256)
    closed = np.min(
        rounds * orders / (2 * sigma**2)
        - (np.log(delta) + np.log(orders)) / (orders - 1)
        + np.log((orders - 1) / orders)
    )
    assert UpdateAccountant(sigma, 1.0, delta).epsilon(rounds) == pytest.approx(closed, rel=0.01)


def test_the_budget_affords_the_rounds_whose_epsilon_stays_within_it():
    accountant = UpdateAccountant(1.0, 1.0, 1e-5)
    budget = (accountant.epsilon(4) + accountant.epsilon(5)) / 2
    assert accountant.affordable_rounds(budget, 20) == 4
    assert accountant.affordable_rounds(0.0, 20) == 20  # no budget
    assert accountant.affordable_rounds(1e6, 20) == 20
    assert accountant.affordable_rounds(accountant.epsilon(1) / 2, 20) == 0


# -- the strategy ------------------------------------------------------------------------------
def test_sampled_sites_follow_flower_fedavg_sampling():
    assert sampled_per_round(_server(**DP), nodes=5, training_sites=4) == 4
    partial = _server(**DP, **{"fraction-train": 0.5, "min-sites": 2})
    assert sampled_per_round(partial, nodes=10, training_sites=10) == 5


def _dp_strategy(noise: float, clip: float = 1.0) -> UpdateDP:
    config = _server(
        **{"dp-update-noise-multiplier": noise, "dp-update-clip-norm": clip},
        **{"max-site-share": 1.0},
    )
    declared = {name: 1000 for name in NAMES.values()}
    strategy = build_strategy(
        config, policy=reply_policy(config, declared), node_names=NAMES, sampled_sites=3
    )
    assert isinstance(strategy, UpdateDP)
    return strategy


def _reply(update: list[float], num_examples: int, node: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.array(update, dtype=np.float32))}),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.0}),
        }
    )
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(content=content, reply_to=instruction)


def _start(strategy: UpdateDP, size: int = 2) -> None:
    gate = gate_of(strategy)
    gate.round_start = ArrayRecord({"w": Array(np.zeros(size, dtype=np.float32))})
    gate.sampled = set(NAMES)


def test_the_gate_takes_the_unweighted_mean_over_the_sampled_sites_whatever_they_report():
    strategy = _dp_strategy(noise=1e-12)
    _start(strategy)
    replies = [_reply([0.3, 0.0], 10, 1), _reply([0.0, 0.6], 500, 2), _reply([0.3, 0.3], 90, 3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    # (0.3 + 0 + 0.3) / 3 and (0 + 0.6 + 0.3) / 3, not weighted by num-examples.
    np.testing.assert_allclose(arrays["w"].numpy(), [0.2, 0.3], atol=1e-6)


def test_a_rejected_site_counts_as_no_update_so_one_site_moves_the_mean_by_clip_over_n():
    strategy = _dp_strategy(noise=1e-12)
    _start(strategy)
    rejected = []
    gate_of(strategy).on_reject = lambda r, site, reason: rejected.append((site, reason))
    replies = [_reply([0.3, 0.0], 10, 1), _reply([0.0, 0.6], 500, 2), _reply([np.nan, 0], 9, 3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [0.1, 0.2], atol=1e-6)
    assert rejected == [("site-3", "non-finite values in w")]


def test_the_server_adds_noise_of_multiplier_times_clip_over_sampled_sites():
    strategy = _dp_strategy(noise=1.5, clip=0.6)
    size = 200_000
    _start(strategy, size)
    np.random.seed(0)
    replies = [_reply(list(np.zeros(size)), 10, node) for node in NAMES]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.std(arrays["w"].numpy()) == pytest.approx(1.5 * 0.6 / 3, rel=0.02)


def test_each_training_message_carries_the_clip_norm_and_the_round_is_reported():
    strategy = _dp_strategy(noise=1.0, clip=0.7)
    seen = []
    strategy.on_round = seen.append
    config = ConfigRecord({"num-rounds": 3})

    class Grid:
        def get_node_ids(self):
            return list(NAMES)

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    messages = list(
        strategy.configure_train(2, ArrayRecord({"w": Array(np.zeros(2))}), config, Grid())
    )
    assert len(messages) == 3
    assert all(m.content["config"][KEY_CLIPPING_NORM] == 0.7 for m in messages)
    assert seen == [2]


def test_an_error_reply_keeps_the_global_model_and_is_recorded_as_a_failed_round():
    strategy = _dp_strategy(noise=1.0)
    _start(strategy)
    failed = []
    gate_of(strategy).on_failed_round = lambda r, reason: failed.append(reason)
    instruction = Message(RecordDict(), dst_node_id=3, message_type="train")
    crashed = Message(Error(code=1, reason="boom"), reply_to=instruction)
    arrays, _ = strategy.aggregate_train(1, [_reply([0.1, 0.1], 10, 1), crashed])
    assert arrays is None
    assert "update-level DP releases no aggregate" in failed[0]


def test_the_noise_for_a_budget_spends_just_that_budget():
    accountant = UpdateAccountant.for_budget(8.0, rounds=20, sample_rate=1.0, delta=1e-5)
    assert accountant.epsilon(20) <= 8.0
    assert accountant.epsilon(20) == pytest.approx(8.0, rel=0.01)
    assert accountant.affordable_rounds(8.0, 25) == 20
