"""Training replies are checked before aggregation; bad ones are dropped with a reason."""

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.serverapp import Grid

from common.config import ServerConfig, default_run_config, from_run_config
from server.strategies import build_strategy, reply_policy
from server.validation import ArrivalGrid, ReplyPolicy

RNG = np.random.default_rng(0)
GLOBAL = {"conv.weight": RNG.normal(size=(4, 3)).astype(np.float32), "bn.n": np.array(3)}


def _record(values) -> ArrayRecord:
    return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in values.items()})


_NODES: dict[str, int] = {}


def _node_of(site: str) -> int:
    """A node id per site name: the test plays the registry."""
    return _NODES.setdefault(site, 100 + len(_NODES))


def _names(replies) -> dict[int, str]:
    """Node id to site name for ``replies``, as the join query (or registry) gives them."""
    return {
        r.metadata.src_node_id: r.content["site"]["site-name"] for r in replies if r.has_content()
    }


def _gated(config: ServerConfig, replies, declared: int = 1000, **kwargs):
    """A strategy whose gate knows the sites of ``replies``, each declaring ``declared``."""
    names = _names(replies)
    policy = reply_policy(config, {name: declared for name in names.values()})
    return build_strategy(config, policy=policy, node_names=names, **kwargs)


def _reply(
    site: str, values=None, num_examples: int = 10, step: float = 0.1, node: int | None = None
) -> Message:
    if values is None:
        noise = RNG.normal(size=(4, 3)).astype(np.float32)
        values = {"conv.weight": GLOBAL["conv.weight"] + step * noise, "bn.n": GLOBAL["bn.n"] + 1}
    content = RecordDict(
        {
            "arrays": _record(values),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.0}),
            "site": ConfigRecord({"site-name": site}),
        }
    )
    node = _node_of(site) if node is None else node
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(content=content, reply_to=instruction)


def _error_reply(node: int) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(Error(code=0, reason="injected crash at site-9"), reply_to=instruction)


def _config(**overrides) -> ServerConfig:
    return from_run_config(ServerConfig, {**default_run_config(), **overrides})


def _checked(replies, policy: ReplyPolicy) -> tuple[list[str], dict[str, str]]:
    """``(accepted sites, {rejected site: reason})`` of one FedAvg round over ``replies``."""
    rejected: dict[str, str] = {}
    names = _names(replies)
    strategy = build_strategy(
        _config(strategy="fedavg"),
        policy=policy,
        node_names=names,
        on_reject=lambda server_round, site, reason: rejected.setdefault(site, reason),
    )
    strategy.reply_gate.round_start = _record(GLOBAL)
    strategy.reply_gate.sampled = set(names)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return [name for name in names.values() if name not in rejected], rejected


def test_each_kind_of_bad_reply_is_rejected_with_its_reason():
    benign = [_reply(f"site-{i}") for i in range(4)]
    nan = {**GLOBAL, "conv.weight": np.full((4, 3), np.nan, np.float32)}
    scaled = {
        **GLOBAL,
        "conv.weight": GLOBAL["conv.weight"]
        + 100 * (benign[0].content["arrays"]["conv.weight"].numpy() - GLOBAL["conv.weight"]),
    }
    wrong_shape = {**GLOBAL, "conv.weight": np.zeros(11, np.float32)}
    missing = {"conv.weight": GLOBAL["conv.weight"]}
    bad = [
        _reply("nan", nan),
        _reply("scaled", scaled),
        _reply("inflated", num_examples=10_000),
        _reply("shape", wrong_shape),
        _reply("missing", missing),
        _reply("zero", num_examples=0),
    ]
    declared = {name: 50 for name in _names([*benign, *bad]).values()}
    policy = ReplyPolicy(declared_examples=declared, max_update_norm_ratio=10.0)
    accepted, reasons = _checked([*benign, *bad], policy)
    assert accepted == [f"site-{i}" for i in range(4)]
    assert reasons["nan"] == "non-finite values in conv.weight"
    assert "exceeds 10x the median" in reasons["scaled"]
    assert reasons["inflated"] == (
        "num-examples = 10000 is outside [1, 50] "
        "(the training images the site declared when it joined)"
    )
    assert "conv.weight is float32[11], expected float32[4, 3]" in reasons["shape"]
    assert "1 missing" in reasons["missing"]
    assert reasons["zero"].startswith("num-examples = 0 is outside [1, 50]")


def test_a_configured_maximum_replaces_the_declared_size():
    policy = ReplyPolicy(declared_examples={"a": 5}, max_num_examples=100)
    reply = _reply("a", num_examples=50)
    accepted, rejected = _checked([reply], policy)
    assert accepted == ["a"] and not rejected


def test_strategy_aggregates_the_valid_replies_and_records_the_rest():
    rejections, failures = [], []
    config = _config(strategy="fedavg", **{"max-site-share": 1.0})
    strategy = build_strategy(
        config,
        policy=reply_policy(config, {"site-0": 100, "site-1": 100, "site-2": 100}),
        on_reject=lambda r, site, reason: rejections.append((r, site, reason)),
        on_failed_round=lambda r, reason: failures.append((r, reason)),
    )
    gate = strategy.reply_gate
    gate.round_start = _record(GLOBAL)
    gate.sampled = {1, 2, 3, 4}  # node 4 never answers
    replies = [_reply("site-0", node=1), _reply("site-1", num_examples=30, node=2)]
    replies.append(_error_reply(node=3))
    gate.node_names = {1: "site-0", 2: "site-1", 3: "site-9", 4: "site-4"}
    expected = (
        10 * replies[0].content["arrays"]["conv.weight"].numpy()
        + 30 * replies[1].content["arrays"]["conv.weight"].numpy()
    ) / 40
    arrays, _ = strategy.aggregate_train(2, replies)
    np.testing.assert_allclose(arrays["conv.weight"].numpy(), expected, rtol=1e-6)
    missing = [site for _, site, reason in rejections if reason.startswith("no reply")]
    assert missing == ["site-4"]
    assert any(site == "site-9" and "injected crash" in reason for _, site, reason in rejections)
    assert not failures


def test_below_quorum_the_round_keeps_the_global_model():
    failures = []
    replies = [_reply("a"), _reply("b")]
    strategy = _gated(
        _config(strategy="fedavg", **{"min-replies": 3}),
        replies,
        on_failed_round=lambda r, reason: failures.append((r, reason)),
    )
    strategy.reply_gate.round_start = _record(GLOBAL)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None and metrics is None
    assert failures and "quorum 3" in failures[0][1]


@pytest.mark.parametrize("name", ["krum", "multikrum"])
def test_krum_leaves_out_the_outlier(name):
    benign = [_reply(f"site-{i}", step=0.01) for i in range(4)]
    outlier = {**GLOBAL, "conv.weight": GLOBAL["conv.weight"] + 50.0}
    replies = [*benign, _reply("bad", outlier)]
    strategy = _gated(
        _config(strategy=name, **{"min-sites": 5, "max-update-norm-ratio": 0.0}), replies
    )
    strategy.reply_gate.round_start = _record(GLOBAL)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.abs(arrays["conv.weight"].numpy() - GLOBAL["conv.weight"]).max() < 1.0


def test_compressed_updates_are_decoded_aggregated_and_counted():
    from common import compression

    traffic = []
    rejections = []
    plain = [_reply(f"site-{i}") for i in range(3)]
    strategy = _gated(
        _config(strategy="fedavg"),
        plain,
        on_reject=lambda r, site, reason: rejections.append((site, reason)),
        on_traffic=lambda r, received, model_bytes: traffic.append((r, received, model_bytes)),
    )
    strategy.reply_gate.round_start = _record(GLOBAL)
    replies, sent_weights = [], []
    for index, reply in enumerate(plain[:2]):
        trained = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        sent_weights.append(trained["conv.weight"])
        records, _ = compression.encode(trained, GLOBAL, "int8" if index == 0 else "fp16")
        for name, record in records.items():
            reply.content[name] = record
        replies.append(reply)
    broken = _reply("site-2")
    broken.content[compression.COMPRESSION] = ConfigRecord({"method": "int8"})  # no scales
    replies.append(broken)
    sent = {f"site-{i}": compression.payload_bytes(r.content) for i, r in enumerate(replies)}
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = np.mean(sent_weights, axis=0)
    np.testing.assert_allclose(arrays["conv.weight"].numpy(), expected, atol=0.01)
    assert arrays["bn.n"].numpy() == GLOBAL["bn.n"] + 1
    assert [site for site, _ in rejections] == ["site-2"]
    assert "undecodable compressed update: conv.weight" in rejections[0][1]
    ((server_round, received, model_bytes),) = traffic
    assert model_bytes == 4 * 12 + 8
    assert received == sent  # what arrived, before decoding


class ArrivingGrid(Grid):
    """Replies arrive one per pull, in the order given: what a slow federation looks like."""

    def __init__(self, replies):
        self.replies = list(replies)
        for index, reply in enumerate(self.replies):  # as if each answered a pushed message
            reply.metadata.__dict__["_reply_to_message_id"] = f"m{index}"

    def push_messages(self, messages):
        return [f"m{index}" for index, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        return [self.replies.pop(0)] if self.replies else []

    def send_and_receive(self, messages, *, timeout=None): ...
    def set_run(self, run): ...
    @property
    def run(self): ...
    def create_message(self, *args, **kwargs): ...
    def get_node_ids(self): ...


def _round(strategy_name: str, fold: bool, **overrides):
    """One training round through an ArrivalGrid: 4 benign sites, a NaN one, a scaled one."""
    rejections = []
    rng = np.random.default_rng(7)
    replies = []
    for node, examples in enumerate((10, 20, 30, 40), start=1):
        step = 0.1 * rng.normal(size=(4, 3)).astype(np.float32)
        values = {"conv.weight": GLOBAL["conv.weight"] + step, "bn.n": GLOBAL["bn.n"] + node}
        replies.append(_reply(f"site-{node}", values, num_examples=examples, node=node))
    nan = {**GLOBAL, "conv.weight": np.full((4, 3), np.nan, np.float32)}
    replies.append(_reply("nan", nan, node=5))
    scaled = {**GLOBAL, "conv.weight": GLOBAL["conv.weight"] + 50.0}
    replies.append(_reply("scaled", scaled, node=6))
    benign = [r.content["arrays"]["conv.weight"].numpy().copy() for r in replies[:4]]
    strategy = _gated(
        _config(strategy=strategy_name, **overrides),
        replies,
        on_reject=lambda r, site, reason: rejections.append((site, reason)),
    )
    gate = strategy.reply_gate
    gate.fold = fold
    gate.round_start = _record(GLOBAL)
    grid = ArrivalGrid(ArrivingGrid(replies), gate.receive, pull_interval_s=0.0)
    instructions = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in range(6)]
    arrived = grid.send_and_receive(instructions, timeout=5)
    return strategy, gate, list(arrived), benign, rejections


@pytest.mark.parametrize("fold", [True, False])
def test_replies_are_checked_as_they_arrive_and_give_the_same_mean_folded_or_held(fold):
    strategy, gate, arrived, benign, rejections = _round("fedavg", fold)
    assert len(arrived) == 6
    # Folded: no reply still holds its weights, so server memory does not grow per site.
    assert all(("arrays" in r.content) is not fold for r in arrived)
    arrays, _ = strategy.aggregate_train(1, arrived)
    expected = np.average(benign, axis=0, weights=[10, 20, 30, 40])
    np.testing.assert_allclose(arrays["conv.weight"].numpy(), expected, rtol=1e-6)
    assert arrays["conv.weight"].numpy().dtype == np.float32
    assert arrays["bn.n"].numpy().dtype == GLOBAL["bn.n"].dtype
    assert int(arrays["bn.n"].numpy()) == 3 + round((10 + 40 + 90 + 160) / 100)
    reasons = dict(rejections)
    assert set(reasons) == {"nan", "scaled"}
    assert "exceeds 10x the median" in reasons["scaled"]  # taken back out of the running sum
    assert gate._spill is None  # the round's spilled updates are deleted


def test_a_server_optimiser_steps_from_the_same_mean_folded_or_held():
    results = []
    for fold in (True, False):
        strategy, _, arrived, _, _ = _round("fedadam", fold, **{"server-learning-rate": 0.1})
        strategy.current_arrays = {k: v.copy() for k, v in GLOBAL.items()}
        arrays, _ = strategy.aggregate_train(1, arrived)
        results.append(arrays["conv.weight"].numpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-7)


def test_below_quorum_after_the_norm_check_the_folded_round_keeps_the_global_model():
    failures = []
    strategy, gate, arrived, _, _ = _round("fedavg", True, **{"min-replies": 5})
    gate.on_failed_round = lambda r, reason: failures.append(reason)
    assert strategy.aggregate_train(1, arrived) == (None, None)
    assert failures and failures[0].startswith("4 valid training replies")


def test_the_arrival_grid_returns_what_arrived_by_the_deadline_and_hands_each_reply_over():
    replies = [_reply("site-1", node=1), _reply("site-2", node=2)]
    seen = []
    grid = ArrivalGrid(ArrivingGrid(replies), seen.append, pull_interval_s=0.01)
    instructions = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2, 3)]
    started = time.monotonic()
    arrived = list(grid.send_and_receive(instructions, timeout=0.3))  # node 3 never replies
    assert 0.3 <= time.monotonic() - started < 2.0
    assert arrived == replies and seen == replies


@pytest.mark.parametrize("fold", [True, False])
def test_the_aggregate_does_not_depend_on_which_site_answered_first(fold):
    rng = np.random.default_rng(3)
    values = [
        {"conv.weight": (rng.normal(size=(4, 3)) * 10.0 ** rng.integers(-3, 3)).astype(np.float32),
         "bn.n": GLOBAL["bn.n"] + i}
        for i in range(6)
    ]  # fmt: skip
    results = []
    for order in (range(6), reversed(range(6)), [3, 0, 5, 1, 4, 2]):
        replies = [_reply(f"site-{i}", values[i], num_examples=7 + 3 * i, node=i) for i in order]
        config = _config(strategy="fedavg", **{"max-update-norm-ratio": 0.0})
        strategy = _gated(config, replies)
        gate = strategy.reply_gate
        gate.fold, gate.round_start = fold, _record(GLOBAL)
        for reply in replies:
            gate.receive(reply)
        arrays, _ = strategy.aggregate_train(1, replies)
        results.append(arrays["conv.weight"].numpy())
    assert all(np.array_equal(results[0], other) for other in results[1:])


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_robust_strategies_hold_updates_on_disk_and_aggregate_as_flower_does(name):
    from flwr.serverapp import strategy as flwr_strategy

    strategy, gate, arrived, benign, rejections = _round(name, False, **{"min-sites": 4})
    # Each accepted update went to disk as it arrived: no reply holds its weights.
    assert not any("arrays" in r.content for r in arrived)
    arrays, _ = strategy.aggregate_train(1, arrived)
    assert gate._spill is None  # the round's updates are deleted
    assert {site for site, _ in rejections} == {"nan", "scaled"}
    reference = {
        "fedmedian": flwr_strategy.FedMedian(),
        "fedtrimmedavg": flwr_strategy.FedTrimmedAvg(beta=0.2),
        "krum": flwr_strategy.Krum(num_malicious_nodes=1),
        "multikrum": flwr_strategy.MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3),
    }[name]
    held = [
        _reply(
            f"site-{node}",
            {"conv.weight": weights, "bn.n": GLOBAL["bn.n"] + node},
            num_examples=10 * node,
            node=node,
        )
        for node, weights in enumerate(benign, start=1)
    ]
    for reply in held:
        del reply.content["site"]
    expected, _ = reference.aggregate_train(1, held)
    result = arrays["conv.weight"].numpy()
    if name == "krum":
        # Krum scores each update by its nearest neighbour's distance: two updates that are
        # each other's nearest tie, and float32 (Flower) and float64 (here) break ties apart.
        flat = [np.concatenate([w.ravel(), [1.0 * n]]) for n, w in enumerate(benign, start=1)]
        distance = [[float(np.sum((a - b) ** 2)) for b in flat] for a in flat]
        scores = np.array([sorted(row)[1] for row in distance])
        best = np.flatnonzero(np.isclose(scores, scores.min()))
        assert any(np.allclose(result, benign[i]) for i in best)
        assert any(np.allclose(expected["conv.weight"].numpy(), benign[i]) for i in best)
        return
    np.testing.assert_allclose(result, expected["conv.weight"].numpy(), rtol=1e-6, atol=1e-7)
