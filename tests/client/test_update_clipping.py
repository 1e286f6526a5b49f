"""Update-level DP at a site: the update is clipped before it leaves, to the run's norm."""

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client import app
from common.config import ClientConfig, default_run_config, from_run_config
from common.privacy import private_model
from common.tasks import get_task

RUN_CONFIG = {
    **default_run_config(),
    "model": "small-cnn",
    "image-size": 32,
    "synthetic-samples-per-site": 40,
    "local-epochs": 1,
    "batch-size": 8,
    "augment": False,
    "learning-rate": 0.01,
    "dp-update-noise-multiplier": 1.0,
    "dp-update-clip-norm": 0.05,
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


def _message(clip: float | None) -> tuple[Message, ArrayRecord]:
    """A training message with the network both sides build under update DP (GroupNorm)."""
    config = from_run_config(ClientConfig, RUN_CONFIG)
    arrays = ArrayRecord(private_model(get_task(config.model_config).build_model()).state_dict())
    settings = {"server-round": 1, "num-rounds": 1}
    if clip is not None:
        settings[KEY_CLIPPING_NORM] = clip
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(settings)})
    return Message(content=content, dst_node_id=1, message_type="train"), arrays


def _update_norm(reply: Message, sent: ArrayRecord) -> float:
    received = reply.content["arrays"]
    return float(
        np.sqrt(
            sum(
                np.sum((received[k].numpy().astype(np.float64) - sent[k].numpy()) ** 2)
                for k in sent
            )
        )
    )


def test_the_site_update_leaves_clipped_to_the_run_clip_norm():
    message, sent = _message(0.05)
    reply = app.update_clipping(message, _context(), app.train)
    assert not reply.has_error()
    norm = _update_norm(reply, sent)
    assert 0.04 < norm <= 0.05 * (1 + 1e-5)  # it trained, then was scaled down to the norm
    # Unclipped, the same training moves the weights much further.
    unclipped = app.train(_message(None)[0], _context())
    assert _update_norm(unclipped, sent) > 0.5


def test_a_site_refuses_a_training_message_asking_for_a_larger_clip_norm_or_none():
    for asked in (1.0, None):
        message, _ = _message(asked)
        reply = app.update_clipping(message, _context(), app.train)
        assert reply.has_error()
        assert "update-level DP needs its update clipped to dp-update-clip-norm = 0.05" in (
            reply.error.reason
        )
