"""Fault injection for tests and simulations: make chosen sites misbehave in chosen rounds.

``radfl simulate --faults SPEC`` (or ``RADFL_FAULTS=SPEC``) runs this module's ClientApp instead
of the production one (``client.app:app``, which never reads ``RADFL_FAULTS``). ``SPEC`` is a
comma-separated list of ``SITE:KIND[@ROUND]`` (every round when no round is given); the
ClientApp reads it when it is built and wraps the production handlers in a Flower mod that, for
training messages of a listed site, does one of:

=============  ==============================================================================
``crash``      raise inside the ClientApp: the site's reply is an error
``hang``       sleep ``RADFL_FAULT_HANG_S`` seconds (default 3600) before replying
``nan``        reply with NaN in every floating-point weight
``scale``      reply with the update multiplied by 100 (``global + 100 * (local - global)``)
``inflate``    claim 1000 times the examples actually trained on
``shape``      reply with one weight of the wrong shape
``ghost``      claim to be site ``ghost`` with 1e12 examples (a hostile site, issue 18)
``overflow``   claim 1e308 examples
``dots``       claim the site name ``../NAME`` in every reply, the join query's included
``inf-query``  declare an infinite training split in the join query
=============  ==============================================================================

The fault mod runs inside the production ClientApp's error containment
(``client.failures``), so an injected crash reaches the coordinator as a real one would.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from client.app import build_app
from client.site import site_name
from common import messages as keys
from common.errors import ConfigError

ENV = "RADFL_FAULTS"
HANG_ENV = "RADFL_FAULT_HANG_S"
KINDS = (
    "crash",
    "hang",
    "nan",
    "scale",
    "inflate",
    "shape",
    "ghost",
    "overflow",
    "dots",
    "inf-query",
)
#: What each kind claims in the reply's metrics and site name (hostile sites).
CLAIMS: dict[str, tuple[dict[str, float], str | None]] = {
    "ghost": ({keys.NUM_EXAMPLES: 1e12}, "ghost"),
    "overflow": ({keys.NUM_EXAMPLES: 1e308}, None),
    "dots": ({}, "../{name}"),
    "inf-query": ({keys.TRAIN_IMAGES: float("inf")}, None),
}
SCALE = 100.0
INFLATE = 1000


@dataclass(frozen=True)
class Fault:
    site: str
    kind: str
    round: int | None  # None: every round


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        site, sep, rest = item.partition(":")
        kind, at, number = rest.partition("@")
        if not sep or kind not in KINDS or (at and not number.isdigit()):
            raise ConfigError(
                f"{ENV}: {item!r} is not SITE:KIND[@ROUND] with KIND one of {', '.join(KINDS)}"
            )
        faults.append(Fault(site, kind, int(number) if at else None))
    return faults


def fault_mod(faults: list[Fault]) -> Mod:
    """A Flower mod that applies ``faults`` to training replies."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type == "query":
            name = site_name(context.node_config)
            claims = [f.kind for f in faults if f.site == name and f.kind in ("dots", "inf-query")]
            reply = call_next(msg, context)
            return _claim(claims, name, msg, reply)
        if msg.metadata.message_type != "train":
            return call_next(msg, context)
        name = site_name(context.node_config)
        config: Mapping[str, object] = keys.config_record(msg.content, keys.CONFIG) or {}
        server_round = int(keys.scalar(config, keys.SERVER_ROUND, 0))
        active = [f for f in faults if f.site == name and f.round in (None, server_round)]
        if not active:
            return call_next(msg, context)
        kind = active[0].kind
        if kind == "crash":
            raise RuntimeError(f"injected crash at {name} in round {server_round}")
        if kind == "hang":
            time.sleep(float(os.environ.get(HANG_ENV, "3600")))
            return call_next(msg, context)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        if kind in CLAIMS:
            return _claim([kind], name, msg, reply)
        return Message(
            content=_corrupt(kind, keys.array_record(msg.content), reply.content),
            reply_to=msg,
        )

    return mod


def mods_from_env() -> list[Mod]:
    text = os.environ.get(ENV, "")
    return [fault_mod(parse_faults(text))] if text.strip() else []


def _claim(kinds: list[str], name: str, msg: Message, reply: Message) -> Message:
    """The reply with the metrics and site name that ``kinds`` claim."""
    if not kinds or reply.has_error():
        return reply
    content = RecordDict({key: record for key, record in reply.content.items()})
    metrics = dict(keys.metric_record(content))
    for kind in kinds:
        values, claimed = CLAIMS[kind]
        metrics.update(values)
        if claimed is not None:
            content[keys.SITE] = ConfigRecord({keys.SITE_NAME: claimed.format(name=name)})
    content[keys.METRICS] = MetricRecord(metrics)  # type: ignore[arg-type]
    return Message(content=content, reply_to=msg)


def _corrupt(kind: str, received: ArrayRecord, content: RecordDict) -> RecordDict:
    arrays = keys.array_record(content)
    metrics = keys.metric_record(content)
    out = RecordDict({name: record for name, record in content.items()})
    if kind == "inflate":
        changed = dict(metrics)
        changed[keys.NUM_EXAMPLES] = int(keys.scalar(metrics, keys.NUM_EXAMPLES)) * INFLATE
        out[keys.METRICS] = MetricRecord(changed)
        return out
    corrupted = ArrayRecord()
    damaged = False
    for name in arrays:
        value = arrays[name].numpy()
        if np.issubdtype(value.dtype, np.floating):
            if kind == "nan":
                value = np.full_like(value, np.nan)
            elif kind == "scale":
                start = received[name].numpy()
                value = (start + SCALE * (value - start)).astype(value.dtype)
            elif kind == "shape" and not damaged and value.ndim > 0:
                value = value.reshape(-1)[:-1].copy()
                damaged = True
        corrupted[name] = Array(np.array(value, order="C"))
    out[keys.ARRAYS] = corrupted
    return out


#: The simulation-only ClientApp (component ``simulations.faults:app``).
app = build_app(mods=mods_from_env())
