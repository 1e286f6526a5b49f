"""The site's side of SecAgg+ (``secure-aggregation = true``; ``server.secagg``).

:func:`secure_aggregation` is a Flower mod on the site ClientApp, inside the audit log and the
error containment (``client.app.build_app``). A training message that carries SecAgg+'s
configuration goes to Flower's ``secaggplus_mod``, which answers the protocol's key-exchange
and unmasking stages itself and, in the *collect masked vectors* stage, calls RadFL's own
``train`` handler; any other message passes untouched.

Between the two, :func:`_masked_update` turns the trained model into what SecAgg+ masks: the
update ``local - global`` of the floating-point entries, in the legacy ``FitRes`` records the
mod reads. The checks the server can no longer make on one site's update run here first, and a
failing update is not sent: the site refuses with its code (``E-SECAGG-...``):

- every value finite;
- ``||local - global|| <= secagg-max-update-norm-ratio * ||global||``;
- every weighted value ``w * (local - global)``, ``w = num-examples / max-weight``, inside the
  quantization range ``[-clipping_range, clipping_range]`` (else SecAgg+ would clip it
  silently);
- ``num-examples <= max-weight`` (else the weighted sum could overflow).

The mod clears every ArrayRecord of the reply: what leaves the site is the masked vector, the
protocol's keys and shares, and the metrics (``num-examples``, losses) in the clear.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from client.disclosure import refusal
from client.site import site_name
from common import messages as keys
from common.config import ClientConfig, from_run_config
from common.errors import RadFLError

#: Tests only: a folder the site writes its true update to before masking (unset: nothing).
TRANSCRIPT_ENV = "RADFL_SECAGG_TEST_TRANSCRIPT"


class UpdateRefusedError(RadFLError):
    """The site's update fails a bound it must meet before it is masked."""

    code = "E-SECAGG"
    category = "site refused to send its update under secure aggregation"


class NonFiniteUpdateError(UpdateRefusedError):
    code = "E-SECAGG-NONFINITE"


class UpdateNormTooLargeError(UpdateRefusedError):
    code = "E-SECAGG-NORM"

    def public_detail(self) -> str:
        return "bound secagg-max-update-norm-ratio"


class UpdateOutsideRangeError(UpdateRefusedError):
    code = "E-SECAGG-RANGE"

    def public_detail(self) -> str:
        return "bound secagg-clipping-range"


class WeightAboveMaxError(UpdateRefusedError):
    code = "E-SECAGG-WEIGHT"


class _ErrorReplyError(Exception):
    """Carries an error reply of the train handler (a refusal) past ``secaggplus_mod``."""

    def __init__(self, reply: Message) -> None:
        super().__init__("error reply")
        self.reply = reply


def secure_aggregation(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: serve SecAgg+'s stages for training messages that carry its configuration."""
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or RECORD_KEY_CONFIGS not in msg.content.config_records
    ):
        return call_next(msg, context)

    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    if configs.get(Key.STAGE) == Stage.SETUP:
        unsafe = unsafe_setup(configs)
        if unsafe is not None:
            return refusal(msg, unsafe)

    def masked_update(message: Message, ctxt: Context) -> Message:
        return _masked_update(message, ctxt, call_next)

    try:
        return secaggplus_mod(msg, context, masked_update)
    except _ErrorReplyError as refused:  # the train handler's own refusal (a spent DP budget)
        return refused.reply


def unsafe_setup(configs: ConfigRecord) -> str | None:
    """Why the site refuses the coordinator's SecAgg+ setup, or None.

    The coordinator chooses how many neighbours hold shares of each site's secrets
    (``share_num``) and how many shares unmask (``threshold``); Flower's mod accepts any. A
    server that can unmask with half the shares or fewer can tell some neighbours a site dropped
    out (to get its key's shares) and others that it did not (to get its self-mask's), and so
    unmask that site's update alone. The site takes part only with a strict majority threshold
    of at least 2 shares.
    """
    shares, threshold = configs.get(Key.SHARE_NUMBER), configs.get(Key.THRESHOLD)
    if not isinstance(shares, int) or not isinstance(threshold, int):
        return "site refuses secure aggregation: the setup names no share_num or threshold"
    if threshold < 2 or 2 * threshold <= shares or threshold > shares:
        return (
            f"site refuses secure aggregation: threshold {threshold} of share_num {shares} "
            "shares would let the server unmask one site's update (the site needs a strict "
            "majority of the shares, and at least 2)"
        )
    return None


def check_update(
    update: dict[str, np.ndarray],
    start: dict[str, np.ndarray],
    num_examples: int,
    *,
    max_weight: float,
    clipping_range: float,
    max_norm_ratio: float,
) -> None:
    """Raise :class:`UpdateRefusedError` (its code says which) unless ``update`` may be masked."""
    for name, value in update.items():
        if not np.isfinite(value).all():
            raise NonFiniteUpdateError(f"the update of {name} has non-finite values")
    norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values()))
    global_norm = math.sqrt(
        sum(float(np.sum(np.square(start[name], dtype=np.float64))) for name in update)
    )
    if norm > max_norm_ratio * global_norm:
        raise UpdateNormTooLargeError(
            f"the update's L2 norm {norm:.4g} exceeds secagg-max-update-norm-ratio "
            f"{max_norm_ratio:g} x the global model's norm {global_norm:.4g}"
        )
    if num_examples > max_weight:
        raise WeightAboveMaxError(
            f"num-examples {num_examples} exceeds the round's max weight {max_weight:g} (the "
            "largest training split the sites declared when they joined)"
        )
    weight = num_examples / max_weight
    largest = max((float(np.max(np.abs(v))) for v in update.values() if v.size), default=0.0)
    if weight * largest > clipping_range:
        raise UpdateOutsideRangeError(
            f"the weighted update reaches {weight * largest:.4g}, outside the quantization range "
            f"+-{clipping_range:g} (secagg-clipping-range)"
        )


def _masked_update(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """RadFL's training reply as the legacy ``FitRes`` SecAgg+ masks: the checked update."""
    reply = call_next(msg, context)
    if reply.has_error():
        raise _ErrorReplyError(reply)
    start = keys.array_record(msg.content)
    trained = keys.array_record(reply.content)
    names = [n for n in start if np.issubdtype(np.dtype(start[n].dtype), np.floating)]
    reference = {name: start[name].numpy() for name in names}
    update = {
        name: trained[name].numpy().astype(np.float64) - reference[name].astype(np.float64)
        for name in names
    }
    num_examples = int(keys.scalar(keys.metric_record(reply.content), keys.NUM_EXAMPLES))
    protocol = cast(ConfigRecord, context.state.config_records[RECORD_KEY_STATE])
    config = from_run_config(ClientConfig, context.run_config)
    check_update(
        update,
        reference,
        num_examples,
        max_weight=float(cast(float, protocol["max_weight"])),
        clipping_range=float(cast(float, protocol["clipping_range"])),
        max_norm_ratio=config.secagg_max_update_norm_ratio,
    )
    transcript = os.environ.get(TRANSCRIPT_ENV, "")
    if transcript:
        _write_true_update(Path(transcript), msg, context, update, num_examples)
    fitres = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters([update[name] for name in names]),
        num_examples=num_examples,
        metrics={},
    )
    content = fitres_to_recorddict(fitres, keep_input=False)
    for name, record in reply.content.items():
        if not isinstance(record, ArrayRecord):  # the trained model stays here
            content[name] = record
    return Message(content=content, reply_to=msg)


def _write_true_update(
    folder: Path, msg: Message, context: Context, update: dict[str, np.ndarray], num_examples: int
) -> None:
    config = keys.config_record(msg.content, keys.CONFIG) or ConfigRecord()
    server_round = int(keys.scalar(config, keys.SERVER_ROUND, 0))
    folder.mkdir(parents=True, exist_ok=True)
    name = site_name(context.node_config)
    arrays = {**update, "__num_examples": np.array(num_examples)}
    np.savez(folder / f"round-{server_round}-{name}-update.npz", **arrays)  # type: ignore[arg-type]
