"""The site ClientApp: a thin adapter between Flower messages and the local trainer."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client import audit, disclosure, pseudo_labels, secagg
from client.failures import contain_errors
from client.site import SiteSplits, load_site, site_name
from client.trainer import LocalTrainer
from common import compression
from common import messages as keys
from common.config import ClientConfig, from_run_config
from common.privacy import private_model
from common.splits import TEST, VALIDATION
from common.tasks import Task, get_task


def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's training split."""
    ledger, refusal = disclosure.privacy_budget(msg, context)
    if refusal is not None:
        return refusal
    config = _config(context)
    task, trainer, model, site = _prepare(msg, context, config)
    settings: Mapping[str, Any] = keys.config_record(msg.content, keys.CONFIG) or {}
    server_round = int(keys.scalar(settings, keys.SERVER_ROUND, 1))
    train_set, pseudo = pseudo_labels.training_set(
        task, model, site.train, site.unlabelled, config, server_round, trainer.device
    )
    if pseudo:
        trainer = LocalTrainer(task, config, train_set, site.validation, device=trainer.device)
    result = trainer.fit(
        model,
        server_round=server_round,
        num_rounds=int(keys.scalar(settings, keys.NUM_ROUNDS, 1)),
        proximal_mu=keys.scalar(settings, keys.PROXIMAL_MU, 0.0),
        ledger=ledger,
    )
    policy = disclosure.DisclosurePolicy.from_node_config(context.node_config)
    metrics = MetricRecord(
        {
            # Labelled studies only: the pseudo-labelled count leaves only when >= k (below).
            keys.NUM_EXAMPLES: result.num_examples - (pseudo or 0),
            **pseudo_labels.disclosed_count(
                pseudo, max(policy.min_cell_size, config.min_cell_size), config.pseudo_labelling
            ),
            keys.TRAIN_LOSS: result.train_loss,
            keys.VALIDATION_LOSS: result.validation_loss,
            keys.EPOCHS_RUN: result.epochs_run,
            keys.SKIPPED_STEPS: result.skipped_steps,
            keys.SKIPPED_ROWS: site.skipped_rows,
            **disclosure.privacy_spent(ledger, context, site.train),
        }
    )
    _keep_local_normalisation(model, context, config, server_round)
    reply = _reply(msg, context, metrics, ArrayRecord(_cpu_state(model)))
    return _compress(reply, msg, context, config.update_compression)


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's validation split; reply metric states."""
    policy = disclosure.DisclosurePolicy.from_node_config(context.node_config)
    refusal = policy.admit_evaluation(msg, context)
    if refusal is not None:
        return refusal
    task, trainer, model, _ = _prepare(msg, context, _config(context))
    states = trainer.evaluate(model)
    metrics = MetricRecord({keys.NUM_EXAMPLES: len(trainer.validation_set), **states.to_record()})
    return _reply(msg, context, metrics)


def final_evaluation(msg: Message, context: Context) -> Message:
    """Evaluate the final model on the validation and test splits, overall and per subgroup.

    The site's disclosure policy (``client.disclosure``) decides: attributes it does not report
    are refused by name, k is the larger of the run's and the site's, and subgroup cells below
    k, with those withheld so that none can be subtracted out, are dropped here: only their
    names leave the site.
    """
    policy = disclosure.DisclosurePolicy.from_node_config(context.node_config)
    refusal = policy.admit_evaluation(msg, context)
    if refusal is not None:
        return refusal
    config = _config(context)
    task, trainer, model, site = _prepare(msg, context, config)
    if hasattr(task, "uncertainty"):  # the run's choice (common.uncertainty)
        task.uncertainty = config.uncertainty
    spec, refused = policy.apply(config.subgroup_spec)
    records: dict[str, dict[str, Any]] = {}
    counts: dict[str, tuple[str, int]] = {}
    suppressed: dict[str, list[str]] = {}
    for split, dataset in ((VALIDATION, site.validation), (TEST, site.test)):
        if dataset is None or len(dataset) == 0:
            continue
        result = trainer.evaluate_cells(model, dataset, spec)
        records[split] = dict(result.overall.to_record())
        counts[split] = (keys.NUM_EXAMPLES, len(dataset))
        for cell, states in result.cells.items():
            records[f"{split}/{cell}"] = dict(states.to_record())
            counts[f"{split}/{cell}"] = (keys.PATIENTS, result.patients[cell])
        suppressed[split] = result.suppressed
    withheld = disclosure.withhold_small_subsets(records, spec.min_cell_size)
    if withheld is not None:
        refused[disclosure.SUBSET_REFUSAL] = withheld
    content = RecordDict()
    for name, record in records.items():
        count_key, count = counts[name]
        content[name] = MetricRecord({count_key: count, **record})
    content[keys.SUPPRESSED] = ConfigRecord(
        {split: cells for split, cells in suppressed.items() if cells}
    )
    if refused:
        content[keys.REFUSED] = ConfigRecord(refused)
    content[keys.SITE] = ConfigRecord({keys.SITE_NAME: site_name(context.node_config)})
    return Message(content=content, reply_to=msg)


def local_training(msg: Message, context: Context) -> Message:
    """Train only on this site's data for ``local-rounds`` rounds' worth of epochs (the
    local-only model of cross-site validation), starting from the received weights."""
    config = _config(context)
    settings: Mapping[str, Any] = keys.config_record(msg.content, keys.CONFIG) or {}
    rounds = int(keys.scalar(settings, keys.LOCAL_ROUNDS, 1))
    local = replace(config, local_epochs=config.local_epochs * rounds)
    ledger, refusal = disclosure.privacy_budget(msg, context, local_epochs=local.local_epochs)
    if refusal is not None:
        return refusal
    task, _, model, site = _prepare(msg, context, config)
    result = LocalTrainer.for_site(task, local, site).fit(model, ledger=ledger)
    disclosure.privacy_spent(ledger, context, site.train)
    metrics = MetricRecord(
        {keys.NUM_EXAMPLES: result.num_examples, keys.TRAIN_LOSS: result.train_loss}
    )
    return _reply(msg, context, metrics, ArrayRecord(_cpu_state(model)))


def describe(msg: Message, context: Context) -> Message:
    """The site's name and the size of each split, so the server can plan and report."""
    config = _config(context)
    site = load_site(context.node_config, config)
    metrics = MetricRecord(
        {
            keys.TRAIN_IMAGES: len(site.train),
            keys.VALIDATION_IMAGES: len(site.validation),
            keys.TEST_IMAGES: len(site.test) if site.test is not None else 0,
            keys.SKIPPED_ROWS: site.skipped_rows,
        }
    )
    return _reply(msg, context, metrics)


def build_app(mods: list[Mod] | None = None) -> ClientApp:
    """The site ClientApp with every handler; ``mods`` wrap them all (for example a mod that
    records each reply, as the privacy test does), inside ``contain_errors``: whatever fails,
    only an error's code and category leave the site. The site's audit log (``client.audit``)
    wraps everything, so it records what actually leaves, sanitised errors included. Training
    messages of SecAgg+ (``secure-aggregation``) are served by ``client.secagg``."""
    client_app = ClientApp(
        mods=[audit.record_reply, contain_errors, secagg.secure_aggregation, *(mods or [])]
    )
    client_app.train(mods=[update_clipping])(train)
    client_app.train(keys.LOCAL_TRAINING)(local_training)
    client_app.evaluate()(evaluate)
    client_app.evaluate(keys.FINAL_EVALUATION)(final_evaluation)
    client_app.query()(describe)
    return client_app


def _prepare(
    msg: Message, context: Context, config: ClientConfig
) -> tuple[Task, LocalTrainer, torch.nn.Module, SiteSplits]:
    task = get_task(config.model_config)
    site: SiteSplits = load_site(context.node_config, config)
    model = task.build_model()
    if config.private_network:
        model = private_model(model)
    model.load_state_dict(keys.array_record(msg.content).to_torch_state_dict())
    _restore_local_normalisation(model, context, config, _model_round(msg))
    trainer = LocalTrainer.for_site(task, config, site)
    return task, trainer, model, site


# -- Update-level DP: the site clips its update before it leaves ----------------------------
def update_clipping(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """With ``dp-update-noise-multiplier > 0``, Flower's ``fixedclipping_mod``: the update
    (the trained weights minus the received ones) is scaled down to ``dp-update-clip-norm`` in
    L2 norm before the reply leaves. The site clips to the run config's norm: a training
    message that asks for a larger one, or none, is refused (the server's noise would no longer
    cover this site's update)."""
    config = _config(context)
    if not config.update_private:
        return call_next(msg, context)
    settings: Mapping[str, Any] = keys.config_record(msg.content, keys.CONFIG) or {}
    asked = settings.get(KEY_CLIPPING_NORM)
    if not isinstance(asked, int | float) or not 0 < float(asked) <= config.dp_update_clip_norm:
        return disclosure.refusal(
            msg,
            f"site refuses to train: update-level DP needs its update clipped to "
            f"dp-update-clip-norm = {config.dp_update_clip_norm:g}, and the training message "
            f"asks for {KEY_CLIPPING_NORM} = {asked!r}",
        )
    return fixedclipping_mod(msg, context, call_next)


# -- FedBN: normalisation layers stay at the site -------------------------------------------
#: ``context.state`` key prefix of the site's normalisation layers after its training in a
#: round (``radfl.local-normalisation.3``: round 3's).
LOCAL_NORMALISATION = "radfl.local-normalisation"
NORMALISATION_LAYERS = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
)


def normalisation_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the model's normalisation layers (weights, biases, statistics)."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, NORMALISATION_LAYERS):
            names |= {f"{prefix}.{key}" if prefix else key for key in module.state_dict()}
    return names


def _keep_local_normalisation(
    model: torch.nn.Module, context: Context, config: ClientConfig, server_round: int
) -> None:
    """After local training in ``server_round``: remember this site's normalisation layers of
    that round, for the next rounds and for a final evaluation of that round's model."""
    if config.keeps_local_normalisation:
        state = model.state_dict()
        kept = {k: state[k].detach().cpu() for k in normalisation_keys(model)}
        context.state[f"{LOCAL_NORMALISATION}.{server_round}"] = ArrayRecord(kept)


def _model_round(msg: Message) -> int | None:
    """The round of the global model a final evaluation received (``None``: not said, the
    latest; a value that is not a finite number counts as not said)."""
    settings: Mapping[str, Any] = keys.config_record(msg.content, keys.CONFIG) or {}
    try:
        value = keys.scalar(settings, keys.MODEL_ROUND)
    except ValueError:
        return None
    return int(value) if math.isfinite(value) else None


def _restore_local_normalisation(
    model: torch.nn.Module, context: Context, config: ClientConfig, model_round: int | None
) -> None:
    """Replace the received normalisation layers by this site's own (FedBN), once it has
    trained: those of the latest round it trained in, up to ``model_round`` when the message
    names the round of its model. The final evaluation of the best round's model thus uses the
    layers that round's evaluation used, not the last round's (a mix that scored test AUC 0.267
    where its validation had scored 0.831); before its first training a site keeps the
    received layers, as its evaluations then did."""
    if not config.keeps_local_normalisation:
        return
    prefix = f"{LOCAL_NORMALISATION}."
    kept = [
        int(key[len(prefix) :])
        for key in context.state
        if key.startswith(prefix) and key[len(prefix) :].isdigit()
    ]
    rounds = [r for r in kept if model_round is None or r <= model_round]
    if rounds:
        record = context.state[f"{prefix}{max(rounds)}"]
        assert isinstance(record, ArrayRecord)
        model.load_state_dict(record.to_torch_state_dict(), strict=False)


# -- Compressed updates (update-compression) ------------------------------------------------
COMPRESSION_RESIDUAL = "radfl.compression-residual"


def _compress(reply: Message, msg: Message, context: Context, method: str) -> Message:
    """Replace the reply's weights by the compressed update against the received global
    model; what compression dropped stays here and joins the next round's update."""
    if method == "none":
        return reply
    previous = context.state.get(COMPRESSION_RESIDUAL)
    residual = (
        {k: v.numpy() for k, v in previous.items()} if isinstance(previous, ArrayRecord) else None
    )
    trained = {k: v.numpy() for k, v in keys.array_record(reply.content).items()}
    reference = {k: v.numpy() for k, v in keys.array_record(msg.content).items()}
    records, kept = compression.encode(trained, reference, method, residual)
    for name, record in records.items():
        reply.content[name] = record
    context.state[COMPRESSION_RESIDUAL] = ArrayRecord({k: Array(v) for k, v in kept.items()})
    return reply


def _config(context: Context) -> ClientConfig:
    return from_run_config(ClientConfig, context.run_config)


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


# Fault injection (tests, simulations) is a separate ClientApp: simulations.faults.
app = build_app()
