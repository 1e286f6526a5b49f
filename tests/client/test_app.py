"""The ClientApp's handlers called directly: FedBN keeps normalisation local, compression."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client import app
from common.config import default_run_config
from common.tasks import get_task

RUN_CONFIG = {
    **default_run_config(),
    "model": "small-cnn",
    "image-size": 32,
    "synthetic-samples-per-site": 40,
    "local-epochs": 1,
    "batch-size": 8,
}


def _context(strategy: str, **overrides) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config={**RUN_CONFIG, "strategy": strategy, **overrides},
    )


def _train_message(state: dict[str, torch.Tensor], server_round: int = 1) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "config": ConfigRecord({"server-round": server_round, "num-rounds": 2}),
        }
    )
    return Message(content=content, dst_node_id=7, message_type="train")


def _global_model():
    from common.config import ClientConfig, from_run_config

    config = from_run_config(ClientConfig, RUN_CONFIG)
    return get_task(config.model_config).build_model()


@pytest.mark.parametrize("strategy", ["fedbn", "fedavg"])
def test_fedbn_sites_keep_their_own_normalisation_layers(strategy):
    model = _global_model()
    norm_keys = app.normalisation_keys(model)
    assert any("running_mean" in k for k in norm_keys)
    context = _context(strategy)
    first = app.train(_train_message(model.state_dict()), context)
    trained = first.content["arrays"].to_torch_state_dict()
    # The next round's global model arrives with other normalisation statistics.
    arriving = {k: v.clone() for k, v in model.state_dict().items()}
    for key in norm_keys:
        if arriving[key].is_floating_point():
            arriving[key] += 5.0
    _, _, prepared, _ = app._prepare(_train_message(arriving, 2), context, app._config(context))
    state = prepared.state_dict()
    for key in norm_keys:
        if strategy == "fedbn":
            assert torch.equal(state[key], trained[key]), key  # the site's own, from round 1
        else:
            assert torch.equal(state[key], arriving[key]), key
    other = next(k for k in state if k not in norm_keys and state[k].is_floating_point())
    assert torch.equal(state[other], arriving[other])  # everything else is the global model


def _final_message(state: dict[str, torch.Tensor], model_round) -> Message:
    said = {} if model_round is None else {"model-round": model_round}
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(said)})
    return Message(content=content, dst_node_id=7, message_type="evaluate.final")


def test_a_fedbn_final_evaluation_uses_the_sites_layers_of_the_evaluated_round():
    # The final model is the best round's; before, every site evaluated it with its layers of
    # the last round (a run's best round 7: validation AUC 0.831, reported test AUC 0.267).
    model = _global_model()
    norm_keys = [k for k in app.normalisation_keys(model) if "running_mean" in k]
    context = _context("fedbn")
    config = app._config(context)
    trained = {}
    arriving = model.state_dict()
    for server_round in (1, 2):
        reply = app.train(_train_message(arriving, server_round), context)
        trained[server_round] = reply.content["arrays"].to_torch_state_dict()
        arriving = {k: v + 1 if v.is_floating_point() else v for k, v in trained[1].items()}
    assert not torch.equal(trained[1][norm_keys[0]], trained[2][norm_keys[0]])
    expected = {1: trained[1], 2: trained[2], 7: trained[2], None: trained[2], 0: arriving}
    expected[float("nan")] = trained[2]  # not a round: as if not said
    for model_round, source in expected.items():
        message = _final_message(arriving, model_round)
        _, _, prepared, _ = app._prepare(message, context, config)
        state = prepared.state_dict()
        for key in norm_keys:
            assert torch.equal(state[key], source[key]), (model_round, key)


@pytest.mark.parametrize("method", ["fp16", "int8"])
def test_a_site_sends_its_compressed_update_and_keeps_what_compression_dropped(method):
    from common import compression

    model = _global_model()
    context = _context("fedavg", **{"update-compression": method})
    message = _train_message(model.state_dict())
    reply = app.train(message, context)
    assert reply.content[compression.COMPRESSION]["method"] == method
    residual = context.state[app.COMPRESSION_RESIDUAL].to_numpy_ndarrays()
    assert residual and all(np.isfinite(r).all() for r in residual)
    decoded = compression.decode(reply.content, message.content["arrays"])
    # The site's full weights are what was decoded plus what it kept back.
    context_plain = _context("fedavg")
    plain = app.train(_train_message(model.state_dict()), context_plain)
    kept = context.state[app.COMPRESSION_RESIDUAL]
    for key in kept:
        full = plain.content["arrays"][key].numpy()  # same seed and data: the same training
        restored = decoded[key].numpy() + kept[key].numpy()
        np.testing.assert_allclose(restored, full, atol=1e-5, err_msg=key)
