"""DP-SGD at a site: the reported epsilon, the budget stop, and what it refuses to combine with."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client import app
from client.site import load_site
from client.trainer import LocalTrainer
from common.config import ClientConfig, default_run_config, from_run_config
from common.errors import ConfigError
from common.privacy import PrivacyLedger, private_model
from common.tasks import get_task
from tests.common.test_privacy import _epsilon

RUN_CONFIG = {
    **default_run_config(),
    "model": "small-cnn",
    "image-size": 32,
    "synthetic-samples-per-site": 60,
    "local-epochs": 1,
    "batch-size": 8,
    "augment": False,
    "dp-noise-multiplier": 1.2,
    "dp-max-grad-norm": 1.0,
    "dp-delta": 1e-5,
}
NODE = {"partition-id": 0, "num-partitions": 2}


def _context(**run_config) -> Context:
    return Context(
        run_id=3,
        node_id=1,
        node_config=NODE,
        state=RecordDict(),
        run_config={**RUN_CONFIG, **run_config},
    )


def _train_message(server_round: int, **run_config) -> Message:
    config = from_run_config(ClientConfig, {**RUN_CONFIG, **run_config})
    model = private_model(get_task(config.model_config).build_model())
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "config": ConfigRecord({"server-round": server_round, "num-rounds": 2}),
        }
    )
    return Message(content=content, dst_node_id=1, message_type="train")


def test_a_dp_site_reports_the_epsilon_an_independent_accountant_gives():
    context = _context()
    config = from_run_config(ClientConfig, context.run_config)
    n = len(load_site(NODE, config).train)
    rate, steps = 8 / n, math.ceil(n / 8)
    first = app.train(_train_message(1), context)
    assert not first.has_error()
    metrics = first.content["metrics"]
    assert metrics["dp-epsilon"] == pytest.approx(_epsilon([(1.2, rate, steps)], 1e-5), rel=0.01)
    assert metrics["dp-studies-per-patient"] >= 1
    # GroupNorm, not BatchNorm: no running statistics leave the site.
    assert not any("running_mean" in k for k in first.content["arrays"])
    second = app.train(_train_message(2), context)
    expected = _epsilon([(1.2, rate, 2 * steps)], 1e-5)
    assert second.content["metrics"]["dp-epsilon"] == pytest.approx(expected, rel=0.01)


def test_a_site_stops_training_at_its_budget_with_a_clear_message():
    context = _context(**{"dp-epsilon": 0.5})
    reply = app.train(_train_message(1, **{"dp-epsilon": 0.5}), context)
    assert reply.has_error()
    assert "site stops training: its privacy budget dp-epsilon = 0.5" in reply.error.reason
    assert PrivacyLedger.from_record(context.state.get("radfl.privacy-ledger")).history == []


def test_dp_sgd_refuses_fedprox_by_name():
    config = from_run_config(ClientConfig, RUN_CONFIG)
    task = get_task(config.model_config)
    site = load_site(NODE, config)
    trainer = LocalTrainer.for_site(task, config, site, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="cannot train FedProx"):
        trainer.fit(private_model(task.build_model()), proximal_mu=0.1, ledger=PrivacyLedger())


def test_a_site_budget_of_its_own_refuses_runs_without_dp_and_caps_runs_with_it():
    plain = Context(
        run_id=3,
        node_id=1,
        node_config={**NODE, "dp-epsilon": 4.0},
        state=RecordDict(),
        run_config={**RUN_CONFIG, "dp-noise-multiplier": 0.0},
    )
    message = _train_message(1)
    refused = app.train(message, plain)
    assert refused.has_error()
    assert "site trains only with DP-SGD (its dp-epsilon = 4)" in refused.error.reason
    capped = Context(
        run_id=3,
        node_id=1,
        node_config={**NODE, "dp-epsilon": 0.5},
        state=RecordDict(),
        run_config={**RUN_CONFIG, "dp-epsilon": 50.0},
    )
    reply = app.train(_train_message(1), capped)
    assert reply.has_error() and "dp-epsilon = 0.5" in reply.error.reason
