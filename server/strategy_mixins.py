"""What every RadFL strategy adds to Flower's, as mixins that override ``configure_*`` and
``aggregate_*`` and call ``super()`` (as Flower's own strategies extend ``FedAvg``):

- :class:`ReplyGateMixin`: the reply checks of ``server.validation`` around the strategy's
  own configure and aggregate steps;
- :class:`LeaveOutMixin`: left-out sites (``leave-out``) get no training message, and are
  still evaluated every round, as external validation;
- :class:`CheckpointMixin`: the strategy's own state between rounds (``state_dict`` /
  ``load_state_dict``) for checkpoints, rolled back when the gate refuses a round's aggregate.

``server.strategies`` composes them with each Flower strategy, outermost first:
``CheckpointMixin``, ``ReplyGateMixin``, ``LeaveOutMixin``, then Flower's class. The gate sees
the messages after left-out sites are removed, so it does not wait for their replies.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from server.validation import ReplyGate


class ReplyGateMixin:
    """Sends only to known sites, checks replies before the strategy aggregates them
    (:class:`server.validation.ReplyGate`, set as ``reply_gate`` by
    ``server.strategies.build_strategy``).

    Rounds are numbered across a resumed run (``reply_gate.offset`` rounds were done before
    this start); Flower's evaluation steps keep Flower's own count.
    """

    reply_gate: ReplyGate

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        gate = self.reply_gate
        server_round += gate.offset
        sent = super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]
        messages = gate.known_only(server_round, sent)
        gate.start_round(arrays, messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sent = super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]
        return self.reply_gate.known_only(server_round + self.reply_gate.offset, sent)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        gate = self.reply_gate
        return gate.aggregate_train(
            server_round + gate.offset,
            replies,
            super().aggregate_train,  # type: ignore[misc]
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        kept = self.reply_gate.evaluation_replies(server_round + self.reply_gate.offset, replies)
        return super().aggregate_evaluate(server_round, kept)  # type: ignore[misc, no-any-return]


class LeaveOutMixin:
    """No training message to the nodes in ``left_out`` (left-out sites)."""

    left_out: frozenset[int] = frozenset()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]
        return [m for m in messages if m.metadata.dst_node_id not in self.left_out]


class CheckpointMixin:
    """The strategy's state from round to round, as plain values a checkpoint stores.

    ``state_attributes`` names the attributes that carry it (a server optimiser's moments,
    momentum and the model it steps from); a strategy without any has an empty state. Flower's
    optimisers update them inside ``aggregate_train``, before the reply gate judges the
    aggregate: when the round is refused, they are put back as they were, so a refused round
    leaves no trace in the next one.
    """

    state_attributes: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, Any]:
        return {
            name: copy.deepcopy(getattr(self, name))
            for name in self.state_attributes
            if getattr(self, name, None) is not None
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = sorted(set(state) - set(self.state_attributes))
        if unknown:
            raise ValueError(
                f"{type(self).__name__} has no state {', '.join(unknown)}; "
                f"its state is {', '.join(self.state_attributes) or 'empty'}"
            )
        for name in self.state_attributes:
            setattr(self, name, copy.deepcopy(state.get(name)))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        before = self.state_dict() if self.state_attributes else None
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is None and before is not None:
            self.load_state_dict(before)
        return arrays, metrics


def leave_out(strategy: Any, node_ids: Iterable[int]) -> None:
    """Send ``strategy`` (or the strategy a wrapper holds as ``strategy``) no training message
    for ``node_ids``."""
    while not isinstance(strategy, LeaveOutMixin) and hasattr(strategy, "strategy"):
        strategy = strategy.strategy
    if not isinstance(strategy, LeaveOutMixin):
        raise TypeError("this strategy was not built by server.strategies.build_strategy")
    strategy.left_out = frozenset(node_ids)


def checkpointable(strategy: Any) -> CheckpointMixin:
    """``strategy``, or the strategy a wrapper holds as ``strategy``, whose state a checkpoint
    keeps."""
    while not isinstance(strategy, CheckpointMixin) and hasattr(strategy, "strategy"):
        strategy = strategy.strategy
    if not isinstance(strategy, CheckpointMixin):
        raise TypeError("this strategy was not built by server.strategies.build_strategy")
    return strategy
