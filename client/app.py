"""The site ClientApp: a thin adapter between Flower messages and the local trainer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import SiteSplits, load_site, site_name
from client.trainer import LocalTrainer
from common import messages as keys
from common.config import ClientConfig, from_run_config
from common.tasks import Task, get_task

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's training split."""
    task, trainer, model, site = _prepare(msg, context)
    config: Mapping[str, Any] = keys.config_record(msg.content, keys.CONFIG) or {}
    result = trainer.fit(
        model,
        server_round=int(keys.scalar(config, keys.SERVER_ROUND, 1)),
        num_rounds=int(keys.scalar(config, keys.NUM_ROUNDS, 1)),
        proximal_mu=keys.scalar(config, keys.PROXIMAL_MU, 0.0),
    )
    metrics = MetricRecord(
        {
            keys.NUM_EXAMPLES: result.num_examples,
            keys.TRAIN_LOSS: result.train_loss,
            keys.VALIDATION_LOSS: result.validation_loss,
            keys.EPOCHS_RUN: result.epochs_run,
            keys.SKIPPED_ROWS: site.skipped_rows,
        }
    )
    return _reply(msg, context, metrics, ArrayRecord(_cpu_state(model)))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's validation split; reply metric states."""
    task, trainer, model, _ = _prepare(msg, context)
    states = trainer.evaluate(model)
    metrics = MetricRecord({keys.NUM_EXAMPLES: len(trainer.validation_set), **states.to_record()})
    return _reply(msg, context, metrics)


def _prepare(
    msg: Message, context: Context
) -> tuple[Task, LocalTrainer, torch.nn.Module, SiteSplits]:
    config = from_run_config(ClientConfig, context.run_config)
    task = get_task(config.model_config)
    site: SiteSplits = load_site(context.node_config, config)
    model = task.build_model()
    model.load_state_dict(keys.array_record(msg.content).to_torch_state_dict())
    trainer = LocalTrainer.for_site(task, config, site)
    return task, trainer, model, site


def _reply(
    msg: Message, context: Context, metrics: MetricRecord, arrays: ArrayRecord | None = None
) -> Message:
    content = RecordDict({keys.METRICS: metrics})
    if arrays is not None:
        content[keys.ARRAYS] = arrays
    content[keys.SITE] = ConfigRecord({keys.SITE_NAME: site_name(context.node_config)})
    return Message(content=content, reply_to=msg)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
