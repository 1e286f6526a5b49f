import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import ServerConfig, default_run_config, from_run_config
from common.errors import RegistryError
from server.strategies import FedAdam, build_strategy, list_strategies, reply_policy

NAMES = {1: "site-1", 2: "site-2"}


def _config(**overrides):
    return from_run_config(ServerConfig, {**default_run_config(), **overrides})


def _build(buffer_keys=(), **overrides):
    """A strategy for the two sites of ``NAMES``, weighting them as they report (no share cap:
    the numbers below are checked by hand)."""
    config = _config(**{"max-site-share": 1.0, **overrides})
    declared = {name: 1000 for name in NAMES.values()}
    return build_strategy(
        config,
        buffer_keys=buffer_keys,
        policy=reply_policy(config, declared),
        node_names=NAMES,
    )


def _arrays(weight: float, running_var: float, batches: int) -> ArrayRecord:
    return ArrayRecord(
        {
            "w": Array(np.array([weight], dtype=np.float32)),
            "bn.running_var": Array(np.array([running_var], dtype=np.float32)),
            "bn.num_batches_tracked": Array(np.array(batches, dtype=np.int64)),
        }
    )


def _started(strategy, arrays: ArrayRecord | None = None):
    """``strategy`` as after ``configure_train``: the round's global model is known."""
    strategy.reply_gate.round_start = arrays or _arrays(0.0, 1.0, 0)
    return strategy


def _reply(weight: float, running_var: float, num_examples: int, node: int) -> Message:
    content = RecordDict(
        {
            "arrays": _arrays(weight, running_var, 4),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.0}),
        }
    )
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(content=content, reply_to=instruction)


@pytest.mark.parametrize("name", list_strategies())
def test_every_strategy_builds_by_name(name):
    strategy = build_strategy(_config(strategy=name))
    assert strategy.min_available_nodes == _config().min_sites


def test_unknown_strategy_raises_with_known_names():
    with pytest.raises(RegistryError, match="fedavg"):
        build_strategy(_config(strategy="fedsomething"))


def test_fedavg_weights_by_num_examples():
    strategy = _started(_build(strategy="fedavg"))
    arrays, _ = strategy.aggregate_train(1, [_reply(1.0, 1.0, 10, 1), _reply(4.0, 4.0, 30, 2)])
    # (1*10 + 4*30) / 40 = 3.25
    assert arrays["w"].numpy()[0] == pytest.approx(3.25)
    # Integer scalars (BatchNorm's batch counter) stay 0-d integers, as the model sent them.
    counter = arrays["bn.num_batches_tracked"].numpy()
    assert counter.shape == () and counter.dtype == np.int64


def test_fedadam_averages_buffers_and_keeps_dtypes():
    strategy = _build(
        buffer_keys=["bn.running_var", "bn.num_batches_tracked"],
        strategy="fedadam",
        **{"server-learning-rate": 0.5},
    )
    assert isinstance(strategy, FedAdam)
    current = _arrays(0.0, 1.0, 0)
    strategy.current_arrays = {k: v.numpy() for k, v in current.items()}
    _started(strategy, current)
    arrays, _ = strategy.aggregate_train(1, [_reply(1.0, 2.0, 10, 1), _reply(1.0, 4.0, 30, 2)])
    # Buffers: the plain weighted average (2*10 + 4*30) / 40 = 3.5, not an Adam step.
    assert arrays["bn.running_var"].numpy()[0] == pytest.approx(3.5)
    assert arrays["bn.num_batches_tracked"].numpy().dtype == np.int64
    # Trainable weights took an Adam step towards the average (positive, at most eta-sized).
    step = arrays["w"].numpy()[0]
    assert 0.0 < step <= 0.5 + 1e-6
    assert arrays["w"].numpy().dtype == np.float32


def test_fedavgm_averages_buffers_and_keeps_its_momentum_on_weights():
    # Momentum on a running variance that falls two rounds running overshoots below zero:
    # 4 -> 2 (the average) -> 2 - (0.9 * 2 + 1.5) = -1.3 where the sites say 0.5.
    keys = ["bn.running_var", "bn.num_batches_tracked"]
    strategy = _build(buffer_keys=keys, strategy="fedavgm")
    current = _arrays(0.0, 4.0, 0)
    strategy.current_arrays = current
    _started(strategy, current)
    first, _ = strategy.aggregate_train(1, [_reply(1.0, 2.0, 10, 1), _reply(1.0, 2.0, 30, 2)])
    _started(strategy, first)
    second, _ = strategy.aggregate_train(2, [_reply(2.0, 0.5, 10, 1), _reply(2.0, 0.5, 30, 2)])
    assert second["bn.running_var"].numpy()[0] == pytest.approx(0.5)
    assert second["bn.num_batches_tracked"].numpy().dtype == np.int64
    # Weights keep the momentum: 1 + (0.9 * 1 + 1) = 2.9, past the sites' plain average of 2.
    assert second["w"].numpy()[0] == pytest.approx(2.9)


def test_fedprox_sends_proximal_mu():
    strategy = build_strategy(_config(strategy="fedprox", **{"proximal-mu": 0.3}))
    assert strategy.proximal_mu == pytest.approx(0.3)


def test_site_config_record_does_not_break_aggregation():
    strategy = _started(_build(strategy="fedavg"))
    replies = [_reply(1.0, 1.0, 10, 1), _reply(3.0, 1.0, 10, 2)]
    for i, reply in enumerate(replies):
        reply.content["site"] = ConfigRecord({"site-name": f"site-{i}"})
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays["w"].numpy()[0] == pytest.approx(2.0)


@pytest.mark.parametrize("name", list_strategies())
def test_strategies_compose_by_subclassing_not_by_replacing_methods(name):
    from server.strategy_mixins import leave_out

    strategy = build_strategy(_config(strategy=name))
    leave_out(strategy, {1})
    steps = ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate")
    assert not set(steps) & set(vars(strategy)), "an instance method was reassigned"


def _configured(strategy, arrays: ArrayRecord):
    """``strategy`` after Flower's ``configure_train`` for round 1 from ``arrays``."""
    strategy.current_arrays = {k: v.numpy() for k, v in arrays.items()}
    return _started(strategy, arrays)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_a_refused_aggregate_leaves_the_server_optimisers_state_as_it_was(name):
    """A server learning rate of 1e39 steps the float32 weights to infinity: the gate refuses
    the aggregate, and Flower's moments, already updated inside its aggregate, are put back."""
    failures = []
    config = _config(strategy=name, **{"max-site-share": 1.0, "server-learning-rate": 1e39})
    strategy = build_strategy(
        config,
        policy=reply_policy(config, {n: 1000 for n in NAMES.values()}),
        node_names=NAMES,
        on_failed_round=lambda server_round, reason: failures.append(reason),
    )
    _configured(strategy, _arrays(0.0, 1.0, 0))
    before = strategy.state_dict()
    assert set(before) == {"current_arrays"}  # no moments before the first accepted round
    assert strategy.aggregate_train(1, [_reply(1.0, 2.0, 10, 1), _reply(1.0, 4.0, 30, 2)]) == (
        None,
        None,
    )
    assert "the aggregate has non-finite values in w" in failures[0]
    assert strategy.m_t is None and strategy.v_t is None
    assert strategy.state_dict().keys() == before.keys()

    # The same round with a sane learning rate is accepted and does move the moments.
    accepted = _build(strategy=name, **{"server-learning-rate": 0.5})
    _configured(accepted, _arrays(0.0, 1.0, 0))
    arrays, _ = accepted.aggregate_train(1, [_reply(1.0, 2.0, 10, 1), _reply(1.0, 4.0, 30, 2)])
    assert arrays is not None and accepted.m_t is not None and accepted.v_t is not None


def test_a_strategys_state_survives_a_checkpoint_and_unknown_state_is_refused(tmp_path):
    from server import checkpoint

    strategy = _configured(
        _build(strategy="fedadam", **{"server-learning-rate": 0.5}), _arrays(0.0, 1.0, 0)
    )
    strategy.aggregate_train(1, [_reply(1.0, 2.0, 10, 1), _reply(1.0, 4.0, 30, 2)])
    path = checkpoint.checkpoint_path(str(tmp_path), "run-1")
    checkpoint.save(path, {"strategy": checkpoint.strategy_state(strategy)})
    fresh = _build(strategy="fedadam", **{"server-learning-rate": 0.5})
    checkpoint.restore_strategy(fresh, checkpoint.load(path)["strategy"])
    for name in ("m_t", "v_t", "current_arrays"):
        for key, value in getattr(strategy, name).items():
            np.testing.assert_array_equal(getattr(fresh, name)[key], value)
    with pytest.raises(ValueError, match="FedAdam has no state momentum_vector"):
        fresh.load_state_dict({"momentum_vector": [np.zeros(1)]})


def test_left_out_sites_get_no_training_message_and_are_not_awaited():
    from server.strategy_mixins import leave_out
    from tests.server.test_final import FakeGrid

    rejections = []
    config = _config(**{"max-site-share": 1.0, "min-sites": 1})
    strategy = build_strategy(
        config,
        policy=reply_policy(config, {n: 1000 for n in NAMES.values()}),
        node_names=NAMES,
        on_reject=lambda server_round, site, reason: rejections.append((site, reason)),
    )
    leave_out(strategy, {2})
    messages = strategy.configure_train(
        1, _arrays(0.0, 1.0, 0), ConfigRecord({}), FakeGrid([1, 2], lambda node, message: None)
    )
    assert [m.metadata.dst_node_id for m in messages] == [1]
    arrays, _ = strategy.aggregate_train(1, [_reply(2.0, 1.0, 10, 1)])
    assert arrays["w"].numpy()[0] == pytest.approx(2.0)
    assert rejections == []  # site-2 was never asked, so its silence is no rejection
