"""The run's sites before training: quorum, the coordinator's registry, each site's
description (name and split sizes), the left-out sites, and the one-message-per-node helper
every server role sends with.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.errors import ConfigError, RadFLError
from server import boundary
from server.strategy_mixins import leave_out

POLL_INTERVAL_S = 0.5


class QuorumError(RadFLError):
    """Too few sites connected before the deadline."""


@dataclass(frozen=True)
class Site:
    """A connected site: its authenticated node, its name, the split sizes it declared."""

    node_id: int
    name: str
    counts: dict[str, int]


def wait_for_sites(grid: Grid, minimum: int, deadline_s: float) -> list[int]:
    """Node ids once at least ``minimum`` sites are connected; raise after ``deadline_s``."""
    started = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() - started > deadline_s:
            raise QuorumError(
                f"{len(nodes)} site(s) connected after {deadline_s:.0f} s; the run needs "
                f"{minimum} (min-sites)"
            )
        time.sleep(POLL_INTERVAL_S)


#: Called with ``(who, reason)`` for a node or site left out of the run before training.
LeftOutCallback = Callable[[str, str], None]


def load_registry(path: str | Path) -> dict[int, str]:
    """Node id to site name, from the coordinator's ``registered.json``
    (``{name: {"node-id": ..., "key": ...}}``, written by ``radfl coordinator add-site``)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"site-registry file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"site-registry file {path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"site-registry file {path} must map site names to entries")
    registry: dict[int, str] = {}
    for name, entry in data.items():
        node = entry.get("node-id") if isinstance(entry, dict) else None
        try:
            boundary.check_site_name(name)
            node_id = boundary.count(node, "node-id", maximum=2**64 - 1)
        except boundary.BadReplyError as exc:
            raise ConfigError(f"site-registry file {path}: entry {name!r}: {exc}") from None
        if node_id in registry:
            raise ConfigError(
                f"site-registry file {path}: node {node_id} is registered as both "
                f"{registry[node_id]} and {name}"
            )
        registry[node_id] = name
    return registry


def describe_sites(
    grid: Grid,
    node_ids: Iterable[int],
    timeout: float,
    registry: Mapping[int, str] | None = None,
    on_left_out: LeftOutCallback | None = None,
) -> dict[int, Site]:
    """Ask every node for its split sizes; name it by ``registry`` (node id to the name
    registered for its key) or, without one (simulation), by the name it gives now, once:
    every later reply from that node is that site's, whatever it claims.

    A node that fails, sends a malformed description, is not registered, or gives a name
    another node gives too, is logged, reported to ``on_left_out`` and left out.
    """
    replies = send(grid, {node: RecordDict() for node in node_ids}, MessageType.QUERY, timeout)
    described: dict[int, tuple[str, dict[str, int]]] = {}
    left_out: dict[str, str] = {}
    for node, reply in replies.items():
        label = f"node-{node}"
        if isinstance(reply, str):
            left_out[label] = f"did not describe itself: {reply}"
            continue
        try:
            description = boundary.check_description(reply.content)
        except boundary.BadReplyError as exc:
            left_out[label] = f"malformed description: {exc}"
            continue
        if registry is not None:
            if node not in registry:
                left_out[label] = "not registered (radfl coordinator add-site)"
                continue
            name = registry[node]
            if description.claimed_name not in (None, name):
                log(
                    WARNING,
                    "[radfl] node %d (registered as %s) calls itself %s: the name is ignored",
                    node,
                    name,
                    description.claimed_name,
                )
        elif description.claimed_name is None:
            left_out[label] = "gave no site name"
            continue
        else:
            name = description.claimed_name
        described[node] = (name, description.counts)
    names = [name for name, _ in described.values()]
    sites: dict[int, Site] = {}
    for node, (name, counts) in described.items():
        if names.count(name) > 1:
            left_out[f"node-{node}"] = f"another node also calls itself {name}"
        else:
            sites[node] = Site(node, name, counts)
    for who, reason in left_out.items():
        log(WARNING, "[radfl] %s left out of the run: %s", who, reason)
        if on_left_out is not None:
            on_left_out(who, reason)
    return sites


exclude_from_training = leave_out  # server.strategy_mixins.LeaveOutMixin


def send(
    grid: Grid, content: Mapping[int, RecordDict], message_type: str, timeout: float
) -> dict[int, Message | str]:
    """Send one message per node and wait; a node's reply, or why there is none."""
    messages = [
        Message(content=record, dst_node_id=node, message_type=message_type)
        for node, record in content.items()
    ]
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(messages, timeout=timeout)}
    out: dict[int, Message | str] = {}
    for node in content:
        reply = replies.get(node)
        if reply is None:
            out[node] = f"no reply within {timeout:.0f} s"
        elif reply.has_error():
            out[node] = f"error {reply.error.code}: {boundary.clean_text(reply.error.reason)}"
        else:
            out[node] = reply
    return out
