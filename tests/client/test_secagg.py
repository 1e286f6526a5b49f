"""The site's checks before its update is masked (client/secagg.py): each failing bound
refuses with its own code, and only the code and category leave the site."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client import secagg
from common.errors import public_message

START = {"w": np.full((2, 2), 3.0), "b": np.zeros(4)}  # ||global|| = 6
BOUNDS = {"max_weight": 100.0, "clipping_range": 0.5, "max_norm_ratio": 0.5}


def test_an_update_within_every_bound_may_be_masked():
    update = {"w": np.full((2, 2), 1.0), "b": np.full(4, -1.0)}  # norm 2.83, weighted 0.5
    secagg.check_update(update, START, 50, **BOUNDS)


@pytest.mark.parametrize(
    ("update", "num_examples", "error", "public"),
    [
        ({"w": np.full((2, 2), np.inf), "b": np.zeros(4)}, 50, secagg.NonFiniteUpdateError,
         "(E-SECAGG-NONFINITE): see the site's log"),
        ({"w": np.full((2, 2), 2.0), "b": np.zeros(4)}, 50, secagg.UpdateNormTooLargeError,
         "(E-SECAGG-NORM): bound secagg-max-update-norm-ratio, see the site's log"),
        ({"w": np.full((2, 2), 1.0), "b": np.zeros(4)}, 101, secagg.WeightAboveMaxError,
         "(E-SECAGG-WEIGHT): see the site's log"),
        ({"w": np.full((2, 2), 1.0), "b": np.zeros(4)}, 60, secagg.UpdateOutsideRangeError,
         "(E-SECAGG-RANGE): bound secagg-clipping-range, see the site's log"),
    ],
)  # fmt: skip
def test_an_update_failing_a_bound_is_refused_with_its_code(update, num_examples, error, public):
    with pytest.raises(error) as refused:
        secagg.check_update(update, START, num_examples, **BOUNDS)
    assert public_message(refused.value) == (
        f"site refused to send its update under secure aggregation {public}"
    )
    assert "2" not in public_message(refused.value)  # no number of the update leaves


def test_a_training_message_without_secagg_configuration_passes_untouched():
    msg = Message(
        content=RecordDict({"config": ConfigRecord({"server-round": 1})}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    seen: list[Message] = []

    def handler(message: Message, ctxt: Context) -> Message:
        seen.append(message)
        return message

    assert secagg.secure_aggregation(msg, context, handler) is msg
    assert seen == [msg]


@pytest.mark.parametrize(("shares", "threshold"), [(4, 2), (5, 1), (3, 4), (1, 1)])
def test_a_setup_a_curious_server_could_unmask_one_site_with_is_refused(shares, threshold):
    """The curious coordinator: a setup whose threshold is not a strict majority of the shares
    (or is below 2) is refused by message before the site makes any key."""
    configs = ConfigRecord(
        {"stage": "setup", "sample_num": 5, "share_num": shares, "threshold": threshold,
         "clipping_range": 100.0, "target_range": 2**24, "mod_range": 2**32, "max_weight": 100.0}
    )  # fmt: skip
    msg = Message(
        content=RecordDict({"secaggplus_configs": configs}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = secagg.secure_aggregation(msg, context, lambda m, c: pytest.fail("reached training"))
    assert reply.has_error()
    assert f"threshold {threshold} of share_num {shares} shares would let the server unmask" in (
        reply.error.reason
    )
    assert "secaggplus_state" not in context.state  # no key was made


def test_a_majority_setup_passes_the_site_check():
    configs = ConfigRecord({"share_num": 3, "threshold": 2})
    assert secagg.unsafe_setup(configs) is None
