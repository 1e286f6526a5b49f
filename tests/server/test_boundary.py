"""A hostile site, played reply by reply (issue 18): every value it was seen to send is
refused by name, nothing it sends ends the run, and no site takes over the model."""

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy

from common.config import ServerConfig, default_run_config, from_run_config
from common.metrics import ClassificationStates
from common.tasks import get_task
from server import boundary, final, rounds
from server.replies import capped_weights
from server.strategies import RadFLStrategy, build_strategy, reply_policy
from tests.server.test_final import FakeGrid, _final_reply

CONFIG = from_run_config(ServerConfig, {**default_run_config(), "model": "small-cnn"})
TASK = get_task(CONFIG.model_config)
GLOBAL = {"w": np.zeros((3, 2), np.float32), "bn.n": np.array(0)}
NAMES = {1: "site-1", 2: "site-2", 3: "site-3"}


def _arrays(values) -> ArrayRecord:
    return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in values.items()})


def _train_reply(node: int, shift: float, metrics=None, claimed: str | None = None) -> Message:
    content = RecordDict(
        {
            "arrays": _arrays({"w": GLOBAL["w"] + shift, "bn.n": GLOBAL["bn.n"] + 1}),
            "metrics": MetricRecord(
                metrics if metrics is not None else {"num-examples": 10, "train-loss": 0.5}
            ),
            "site": ConfigRecord({"site-name": claimed or NAMES.get(node, "x")}),
        }
    )
    return Message(content=content, reply_to=Message(RecordDict(), node, "train"))


def _gate(**overrides):
    rejected, failed = [], []
    config = from_run_config(ServerConfig, {**default_run_config(), **overrides})
    strategy = build_strategy(
        config,
        policy=reply_policy(config, {name: 20 for name in NAMES.values()}),
        node_names=NAMES,
        on_reject=lambda r, site, reason: rejected.append((site, reason)),
        on_failed_round=lambda r, reason: failed.append(reason),
    )
    strategy.reply_gate.round_start = _arrays(GLOBAL)
    return strategy, dict(rejected=rejected, failed=failed)


def test_a_ghost_name_with_1e12_examples_gets_its_nodes_cap_and_is_refused():
    strategy, seen = _gate(**{"max-update-norm-ratio": 0.0})
    honest = [_train_reply(1, 1.0), _train_reply(2, 2.0)]
    ghost = _train_reply(3, 100.0, {"num-examples": 1e12, "train-loss": 0.1}, claimed="ghost")
    arrays, _ = strategy.aggregate_train(1, [*honest, ghost])
    assert seen["rejected"] == [
        (
            "site-3",
            "num-examples = 1e+12 is outside [1, 20] "
            "(the training images the site declared when it joined)",
        )
    ]
    np.testing.assert_allclose(arrays["w"].numpy(), 1.5)


def test_a_reply_from_a_node_never_described_is_refused_not_given_a_default_cap():
    strategy, seen = _gate()
    stranger = _train_reply(99, 100.0, claimed="site-1")  # claims a real site's name
    arrays, _ = strategy.aggregate_train(1, [_train_reply(1, 1.0), stranger])
    assert seen["rejected"] == [("node-99", "node-99 was never described or registered")]
    np.testing.assert_allclose(arrays["w"].numpy(), 1.0)


def test_a_node_never_described_gets_no_training_or_evaluation_message():
    strategy, seen = _gate(**{"min-sites": 4})
    grid = FakeGrid([1, 2, 3, 99], lambda node, message: None)
    start = ArrayRecord({"w": torch.zeros(1)})
    trained = strategy.configure_train(1, start, ConfigRecord({}), grid)
    evaluated = strategy.configure_evaluate(1, start, ConfigRecord({}), grid)
    assert sorted(m.metadata.dst_node_id for m in trained) == [1, 2, 3]
    assert sorted(m.metadata.dst_node_id for m in evaluated) == [1, 2, 3]
    assert seen["rejected"] == [
        ("node-99", "node was never described or registered: left out of the run")
    ]  # logged once, not once per message


@pytest.mark.parametrize("value", [1e308, math.inf, math.nan, -1, 0, 2.5, 2**62])
def test_num_examples_outside_whole_numbers_up_to_the_declared_size_is_refused(value):
    strategy, seen = _gate()
    bad = _train_reply(3, 5.0, {"num-examples": value, "train-loss": 0.1})
    arrays, _ = strategy.aggregate_train(1, [_train_reply(1, 1.0), bad])
    assert [site for site, _ in seen["rejected"]] == ["site-3"]
    assert seen["rejected"][0][1].startswith("num-examples")
    assert np.isfinite(arrays["w"].numpy()).all()


def test_a_reply_without_its_metrics_record_is_refused_not_a_crash():
    strategy, seen = _gate()
    bare = _train_reply(3, 1.0)
    del bare.content["metrics"]
    strategy.aggregate_train(1, [_train_reply(1, 1.0), bare])
    assert seen["rejected"] == [("site-3", "reply has no MetricRecord 'metrics'")]


def test_unknown_metric_keys_and_records_are_refused_by_name():
    strategy, seen = _gate()
    extra = _train_reply(2, 1.0, {"num-examples": 10, "train-loss": 0.5, "sneaky": 1.0})
    record = _train_reply(3, 1.0)
    record.content["payload"] = MetricRecord({"x": 1.0})
    strategy.aggregate_train(1, [_train_reply(1, 1.0), extra, record])
    assert dict(seen["rejected"]) == {
        "site-2": "metrics: unknown key(s) sneaky",
        "site-3": "unknown record(s) payload in the reply",
    }


def test_one_site_of_three_keeps_below_half_of_the_weight():
    assert CONFIG.max_site_share == pytest.approx(0.45)
    strategy, _ = _gate()
    strategy.reply_gate.policy.declared_examples = {name: 10**6 for name in NAMES.values()}
    replies = [
        _train_reply(1, 0.0, {"num-examples": 10, "train-loss": 0.5}),
        _train_reply(2, 0.0, {"num-examples": 10, "train-loss": 0.5}),
        _train_reply(3, 1.0, {"num-examples": 10**6, "train-loss": 0.5}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    # site-3 (the only one moving w, by 1.0) is cut to 0.45 of the total weight.
    np.testing.assert_allclose(arrays["w"].numpy(), 0.45, rtol=1e-6)


def test_capped_weights_by_hand():
    # 10, 10, 80 at 0.45: c = 0.45 * 20 / (1 - 0.45) = 16.36..., its share 16.36 / 36.36.
    capped = capped_weights([10.0, 10.0, 80.0], 0.45)
    assert capped[:2] == [10.0, 10.0]
    assert capped[2] / sum(capped) == pytest.approx(0.45)
    assert capped_weights([10.0, 20.0, 30.0], 0.6) == [10.0, 20.0, 30.0]  # none above
    assert capped_weights([1.0, 99.0], 0.45) == [1.0, 1.0]  # no weighting fits: equal
    assert capped_weights([5.0, 5.0], 1.0) == [5.0, 5.0]


class _FaultyFedAvg(flwr_strategy.FedAvg):
    """Flower's FedAvg, but its aggregate is ``result`` whatever the replies."""

    def __init__(self, result) -> None:
        super().__init__()
        self.result = result

    def aggregate_train(self, server_round, replies):
        return _arrays(self.result), None


class _Aggregating(RadFLStrategy, _FaultyFedAvg):
    """The reply gate around a faulty aggregate."""


def test_a_non_finite_or_too_large_aggregate_fails_the_round_and_keeps_the_model():
    for result, reason in (
        ({"w": np.full((3, 2), np.inf, np.float32), "bn.n": np.array(1)}, "non-finite"),
        ({"w": np.full((3, 2), 50.0, np.float32), "bn.n": np.array(1)}, "moves the model"),
    ):
        strategy, seen = _gate()
        broken = _Aggregating(result)
        broken.reply_gate = strategy.reply_gate
        assert broken.aggregate_train(1, [_train_reply(1, 1.0)]) == (None, None)
        assert reason in seen["failed"][0] and "the global model is kept" in seen["failed"][0]


def _describe(node, message, **metrics):
    values = {"train-images": 20, "validation-images": 10, "test-images": 10, **metrics}
    return RecordDict(
        {"metrics": MetricRecord(values), "site": ConfigRecord({"site-name": f"site-{node}"})}
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (math.inf, "train-images must be a whole number, got inf"),
        (1e300, "train-images = 1e+300 is outside [0, 1000000000]"),
        (-3, "train-images = -3 is outside [0, 1000000000]"),
        ([1.0, 2.0], "train-images must be a number, got list"),
    ],
)
def test_a_bad_join_query_value_leaves_that_node_out_before_round_one(value, reason):
    left_out = []

    def handler(node, message):
        return _describe(node, message, **({"train-images": value} if node == 2 else {}))

    sites = final.describe_sites(
        FakeGrid([1, 2], handler), [1, 2], 5, on_left_out=lambda *a: left_out.append(a)
    )
    assert list(sites) == [1]
    assert left_out == [("node-2", f"malformed description: {reason}")]


@pytest.mark.parametrize("name", ["../etc", "a?b", "x" * 251, "", "site 1", "a/b"])
def test_a_site_name_mlflow_cannot_take_leaves_that_node_out(name):
    def handler(node, message):
        content = _describe(node, message)
        if node == 2:
            content["site"] = ConfigRecord({"site-name": name})
        return content

    left_out = []
    sites = final.describe_sites(
        FakeGrid([1, 2], handler), [1, 2], 5, on_left_out=lambda *a: left_out.append(a)
    )
    assert list(sites) == [1]
    assert "is not 1-63 letters, digits, '-' or '_'" in left_out[0][1]


def _evaluation(node: int, n: int = 6, **changes) -> Message:
    states = ClassificationStates(2)
    rng = np.random.default_rng(node)
    target = rng.integers(0, 2, n)
    states.update(np.stack([1 - target * 0.8, target * 0.8], 1), target)
    record = {"num-examples": n, **states.to_record(), **changes}
    content = RecordDict(
        {"metrics": MetricRecord(record), "site": ConfigRecord({"site-name": "ghost"})}
    )
    return Message(content=content, reply_to=Message(RecordDict(), node, "evaluate"))


def _evaluate_gate(monkeypatch):
    monkeypatch.setattr(rounds.tracking, "log_metrics", lambda metrics, step: None)
    recorder = rounds.RoundRecorder(TASK, num_rounds=1)
    rejected = []
    strategy = build_strategy(
        CONFIG,
        evaluate_metrics_aggr_fn=recorder.aggregate_evaluate,
        policy=reply_policy(
            CONFIG, {}, declared_validation={n: 10 for n in NAMES.values()}, task=TASK
        ),
        node_names=NAMES,
        on_reject_evaluation=lambda r, site, reason: rejected.append((site, reason)),
    )
    return strategy, rejected


def test_a_state_of_1e300_is_refused_before_any_int64_cast(monkeypatch):
    strategy, rejected = _evaluate_gate(monkeypatch)
    count = [1e300]
    out = strategy.aggregate_evaluate(1, [_evaluation(1), _evaluation(2, **{"state.count": count})])
    assert rejected == [
        ("site-2", "metrics: state.count must be finite, non-negative and at most 2**53")
    ]
    assert out["pooled/num-examples"] == 6  # site-1 alone
    assert "site/site-1/auc" in out and not any("ghost" in key for key in out)


def test_histogram_totals_must_equal_the_count_and_counts_the_declared_split(monkeypatch):
    strategy, rejected = _evaluate_gate(monkeypatch)
    honest = _evaluation(1)
    padded = _evaluation(2)
    histogram = list(padded.content["metrics"]["state.histogram"])
    histogram[0] += 5  # five cases that the count does not have
    padded.content["metrics"]["state.histogram"] = histogram
    too_many = _evaluation(3, n=12)  # site-3 declared 10 validation images
    strategy.aggregate_evaluate(1, [honest, padded, too_many])
    reasons = dict(rejected)
    assert reasons["site-2"].startswith("metrics: metric states disagree: count 6")
    assert reasons["site-3"] == "num-examples = 12 is outside [0, 10]"


def test_an_evaluation_without_metrics_or_from_a_stranger_is_refused_not_a_crash(monkeypatch):
    strategy, rejected = _evaluate_gate(monkeypatch)
    bare = _evaluation(2)
    del bare.content["metrics"]
    error = Message(
        Error(code=3, reason="Traceback\n\x1b[31mboom"),
        reply_to=Message(RecordDict(), 3, "evaluate"),
    )
    out = strategy.aggregate_evaluate(1, [_evaluation(1), bare, _evaluation(77), error])
    assert dict(rejected) == {
        "site-2": "reply has no MetricRecord 'metrics'",
        "node-77": "node-77 was never described or registered",
        "site-3": "error reply (?[31mboom)",
    }
    assert out["pooled/num-examples"] == 6


def test_a_final_evaluation_with_inf_or_1e300_leaves_that_site_out_and_the_run_goes_on():
    def handler(node, message):
        reply = _final_reply(f"s{node}", node)
        if node == 2:
            reply["test"]["num-examples"] = math.inf
        if node == 3:
            reply["validation/sex=F"]["patients"] = 1e300
        return reply

    sites = {
        n: final.Site(n, f"site-{n}", {"validation-images": 60, "test-images": 60})
        for n in (1, 2, 3)
    }
    splits, failed = final.final_evaluation(
        FakeGrid([1, 2, 3], handler),
        sites,
        {"w": torch.zeros(1)},
        2,
        5,
        min_cell_size=1,
        task=TASK,
    )
    assert sorted(failed) == ["site-2", "site-3"]
    assert "test num-examples must be a whole number, got inf" in failed["site-2"]
    assert "validation/sex=F patients = 1e+300 is outside [0, 60]" in failed["site-3"]
    assert list(splits["test"].sites) == ["site-1"]


def test_a_final_evaluation_larger_than_the_declared_split_is_refused():
    sites = {1: final.Site(1, "site-1", {"validation-images": 60, "test-images": 59})}
    _, failed = final.final_evaluation(
        FakeGrid([1], lambda node, message: _final_reply("x", 1)),
        sites,
        {"w": torch.zeros(1)},
        2,
        5,
        min_cell_size=1,
        task=TASK,
    )
    assert "test num-examples = 60 is outside [0, 59]" in failed["site-1"]


def test_error_text_from_a_site_is_bounded_and_cleaned_before_it_is_logged():
    text = "\x1b[31mred\x1b[0m\n" + "y" * 10_000
    assert boundary.clean_text(text) == boundary.clean_text(text)[: boundary.MAX_TEXT]
    assert len(boundary.clean_text(text)) == boundary.MAX_TEXT
    assert "\x1b" not in boundary.clean_text(text) and "\n" not in boundary.clean_text(text)
    replies = final._send(
        FakeGrid([1], lambda node, message: Error(code=1, reason=text)),
        {1: RecordDict()},
        "query",
        5,
    )
    assert len(replies[1]) < 400 and "\x1b" not in replies[1]


def test_a_dp_sites_spent_epsilon_passes_the_boundary_and_a_non_finite_one_is_refused():
    strategy, seen = _gate(**{"max-update-norm-ratio": 0.0})
    spent = {"num-examples": 10, "train-loss": 0.5, "dp-epsilon": 2.5}
    lying = {"num-examples": 10, "train-loss": 0.5, "dp-epsilon": math.inf}
    arrays, _ = strategy.aggregate_train(
        1, [_train_reply(1, 1.0, spent), _train_reply(2, 1.0, spent), _train_reply(3, 9.0, lying)]
    )
    assert [site for site, _ in seen["rejected"]] == ["site-3"]
    assert "dp-epsilon = inf is not a finite number" in seen["rejected"][0][1]
    np.testing.assert_allclose(arrays["w"].numpy(), 1.0)
    checked = boundary.check_train_metrics(_train_reply(1, 1.0, spent).content, 20)
    assert checked["dp-epsilon"] == 2.5
    without = boundary.check_train_metrics(_train_reply(1, 1.0).content, 20)
    assert "dp-epsilon" not in without  # a run without DP logs no epsilon


def test_the_checked_final_evaluation_drops_cells_below_k_with_their_attribute_and_logs_refusals(
    caplog,
):
    def handler(node, message):
        reply = _final_reply(f"s{node}", node)
        reply["refused"] = ConfigRecord({"patient_id": "an identifier\nis never reported"})
        return reply

    sites = {1: final.Site(1, "site-1", {"validation-images": 60, "test-images": 60})}
    splits, failed = final.final_evaluation(
        FakeGrid([1], handler), sites, {"w": torch.zeros(1)}, 2, 5, min_cell_size=30, task=TASK
    )
    assert failed == {}
    # sex=F has 25 patients, below k = 30: dropped and counted as suppressed, whatever was sent
    for split in ("validation", "test"):
        assert "sex=F" not in splits[split].cells
        assert splits[split].suppressed["sex=F"] == ["site-1"]
    assert "site site-1 refused subgroup attribute patient_id: an identifier?is never reported" in (
        caplog.text
    )
    assert "below min-cell-size 30" in caplog.text
