import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.config import ServerConfig, default_run_config, from_run_config
from common.metrics import ClassificationStates
from common.tasks import get_task
from server import rounds


def _eval_reply(name: str, probs, target) -> RecordDict:
    states = ClassificationStates(2)
    states.update(np.asarray(probs), np.asarray(target))
    return RecordDict(
        {
            "metrics": MetricRecord({"num-examples": len(target), **states.to_record()}),
            "site": ConfigRecord({"site-name": name}),
        }
    )


@pytest.fixture
def recorder(monkeypatch):
    logged: dict[int, dict[str, float]] = {}
    monkeypatch.setattr(
        rounds.tracking,
        "log_metrics",
        lambda metrics, step: logged.setdefault(step, {}).update(metrics),
    )
    config = from_run_config(ServerConfig, default_run_config())
    rec = rounds.RoundRecorder(get_task(config.model_config), num_rounds=2)
    rec.logged = logged
    return rec


def test_pooled_metrics_come_from_summed_states_and_sites_are_named(recorder):
    a = _eval_reply("north", [[0.9, 0.1], [0.2, 0.8]], [0, 1])
    b = _eval_reply("south", [[0.4, 0.6], [0.7, 0.3], [0.1, 0.9]], [0, 0, 1])
    out = recorder.aggregate_evaluate([a, b], "num-examples")
    # Pooled: positives 0.8, 0.9; negatives 0.1, 0.6, 0.3: all 6 pairs ranked right.
    assert out["pooled/auc"] == pytest.approx(1.0)
    assert out["pooled/accuracy"] == pytest.approx(4 / 5)
    assert out["pooled/num-examples"] == 5
    assert out["site/north/accuracy"] == pytest.approx(1.0)
    assert out["site/south/accuracy"] == pytest.approx(2 / 3)


def test_end_of_round_logs_at_round_step_and_keeps_best_model(recorder):
    state = {"w": torch.tensor([1.0])}
    good = _eval_reply("north", [[0.9, 0.1], [0.2, 0.8]], [0, 1])
    bad = _eval_reply("north", [[0.1, 0.9], [0.8, 0.2]], [0, 1])
    recorder.aggregate_evaluate([good], "num-examples")
    recorder.end_of_round(1, ArrayRecord(state))
    recorder.aggregate_evaluate([bad], "num-examples")
    recorder.end_of_round(2, ArrayRecord({"w": torch.tensor([2.0])}))
    assert recorder.logged[1]["pooled/auc"] == pytest.approx(1.0)
    assert recorder.logged[2]["pooled/auc"] == pytest.approx(0.0)
    assert recorder.best_round == 1
    assert recorder.best_state["w"].item() == 1.0


def test_train_loss_is_weighted_by_samples(recorder):
    def reply(name, loss, n):
        return RecordDict(
            {
                "metrics": MetricRecord({"num-examples": n, "train-loss": loss}),
                "site": ConfigRecord({"site-name": name}),
            }
        )

    out = recorder.aggregate_train([reply("a", 1.0, 10), reply("b", 3.0, 30)], "num-examples")
    assert out["train/loss"] == pytest.approx(2.5)
    assert out["site/b/train-loss"] == 3.0


def test_external_sites_are_kept_out_of_pooled_values_and_logged_on_their_own(monkeypatch):
    monkeypatch.setattr(rounds.tracking, "log_metrics", lambda metrics, step: None)
    config = from_run_config(ServerConfig, default_run_config())
    rec = rounds.RoundRecorder(
        get_task(config.model_config), num_rounds=1, external_sites=["south"]
    )
    a = _eval_reply("north", [[0.9, 0.1], [0.2, 0.8]], [0, 1])
    b = _eval_reply("south", [[0.4, 0.6], [0.7, 0.3], [0.1, 0.9]], [0, 0, 1])
    out = rec.aggregate_evaluate([a, b], "num-examples")
    assert out["pooled/num-examples"] == 2
    assert out["pooled/auc"] == 1.0
    assert "external/south/auc" in out and "site/south/auc" not in out
    rec.end_of_round(1, ArrayRecord({"w": torch.zeros(1)}))
    assert [(r["round"], r["site"], r["role"]) for r in rec.site_rows] == [
        (1, "north", "training"),
        (1, "south", "external"),
    ]


def test_a_site_with_bad_states_is_left_out_of_the_round_not_the_run(recorder):
    good = _eval_reply("north", [[0.9, 0.1], [0.2, 0.8]], [0, 1])
    bad = _eval_reply("south", [[0.4, 0.6]], [0])
    bad["metrics"]["state.histogram"] = [float("nan")] * len(bad["metrics"]["state.histogram"])
    out = recorder.aggregate_evaluate([good, bad], "num-examples")
    assert out["pooled/auc"] == 1.0 and out["pooled/num-examples"] == 2
    assert out["site/south/rejected-evaluation"] == 1.0
    assert "site/south/auc" not in out
