"""Compressed updates: sizes, reconstruction error, error feedback, and bad payloads."""

import zlib

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common import compression
from common.errors import ConfigError
from common.models import build_model

RNG = np.random.default_rng(0)


def _record(values) -> ArrayRecord:
    return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in values.items()})


def _model_state() -> dict[str, np.ndarray]:
    model = build_model("resnet18", spatial_dims=2, in_channels=1, out_channels=2)
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _trained(reference: dict[str, np.ndarray], step: float = 0.01) -> dict[str, np.ndarray]:
    out = {}
    for key, value in reference.items():
        if np.issubdtype(value.dtype, np.floating):
            out[key] = (value + step * RNG.normal(size=value.shape)).astype(value.dtype)
        else:
            out[key] = value + 5
    return out


def _roundtrip(trained, reference, method, residual=None):
    records, kept = compression.encode(trained, reference, method, residual)
    records["site"] = ConfigRecord({"site-name": "site-0"})
    decoded = compression.decode(records, _record(reference))
    return records, {k: decoded[k].numpy() for k in decoded}, kept


@pytest.mark.parametrize(("method", "max_ratio"), [("fp16", 0.501), ("int8", 0.25)])
def test_compressed_updates_are_small_and_decode_close_to_the_weights(method, max_ratio):
    reference = _model_state()
    trained = _trained(reference)
    records, decoded, kept = _roundtrip(trained, reference, method)
    full = sum(v.size * 4 if v.dtype.kind == "f" else v.nbytes for v in reference.values())
    ratio = compression.payload_bytes(records) / full
    assert ratio <= max_ratio
    assert set(decoded) == set(reference)
    for key, value in decoded.items():
        assert value.dtype == reference[key].dtype and value.shape == reference[key].shape
        if value.dtype.kind != "f":
            np.testing.assert_array_equal(value, trained[key])  # counters travel unchanged
            continue
        delta = trained[key] - reference[key]
        error = np.abs(value - trained[key])
        if method == "int8":
            rows = delta.reshape(delta.shape[0], -1) if delta.ndim >= 2 else delta.reshape(1, -1)
            step = np.abs(rows).max(axis=1) / 127  # one quantisation step per output channel
            assert (error.reshape(rows.shape) <= step[:, None] / 2 + 1e-6).all(), key
        else:
            assert error.max() <= 1e-3 * max(np.abs(delta).max(), 1e-6) + 1e-7, key
        # What was dropped is kept for the next round, exactly.
        np.testing.assert_allclose(kept[key], trained[key] - value, atol=1e-6)


def test_error_feedback_delivers_the_sum_of_updates_over_rounds():
    reference = {"w": np.zeros((8, 16), np.float32)}
    true_total = np.zeros((8, 16), np.float32)
    sent_with, sent_without = np.zeros_like(true_total), np.zeros_like(true_total)
    residual = None
    for _ in range(30):
        # A small, persistent update: the kind that 8-bit rounding would lose every round.
        update = {"w": (0.001 + 0.0001 * RNG.random((8, 16))).astype(np.float32)}
        update["w"][:, 0] = 1.0  # one large value per row sets the scale
        true_total += update["w"]
        _, decoded, residual = _roundtrip(update, reference, "int8", residual)
        sent_with += decoded["w"]
        _, plain, _ = _roundtrip(update, reference, "int8")
        sent_without += plain["w"]
    error_with = np.abs(sent_with - true_total)[:, 1:].max()
    error_without = np.abs(sent_without - true_total)[:, 1:].max()
    assert error_with <= 1.0 / 127  # at most one quantisation step, whatever the rounds
    assert error_without > 10 * error_with  # without feedback the small values were lost


def test_none_sends_the_weights_themselves():
    reference = _model_state()
    trained = _trained(reference)
    records, kept = compression.encode(trained, reference, "none")
    assert compression.COMPRESSION not in records and not kept
    decoded = compression.decode(records, _record(reference))
    np.testing.assert_array_equal(decoded["fc.weight"].numpy(), trained["fc.weight"])


def test_bad_payloads_name_the_array():
    reference = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(4, np.float32)}
    records, _ = compression.encode(_trained(reference), reference, "int8")
    del records[compression.SCALES]
    with pytest.raises(ValueError, match="w: int8 update without"):
        compression.decode(records, _record(reference))
    records, _ = compression.encode(_trained(reference), reference, "int8")
    records["arrays"]["w"] = Array(np.frombuffer(b"not deflate", np.uint8).copy())
    with pytest.raises(ValueError, match="w: int8 update is not valid deflate data"):
        compression.decode(records, _record(reference))
    # A payload that inflates beyond the model's size stops at it.
    bomb = np.frombuffer(zlib.compress(bytes(10_000_000)), np.uint8).copy()
    records["arrays"]["w"] = Array(bomb)
    with pytest.raises(ValueError, match="w: int8 update holds other than the 12 values"):
        compression.decode(records, _record(reference))
    records, _ = compression.encode(_trained(reference), reference, "fp16")
    records["arrays"]["w"] = Array(np.zeros((2, 6), np.float16))
    with pytest.raises(ValueError, match=r"w: update of shape \[2, 6\]"):
        compression.decode(records, _record(reference))
    records[compression.COMPRESSION] = ConfigRecord({"method": "zip"})
    with pytest.raises(ValueError, match="unknown update compression 'zip'"):
        compression.decode(records, _record(reference))
    with pytest.raises(ConfigError, match="update-compression"):
        compression.encode(reference, reference, "int4")


def test_empty_content_has_no_payload():
    assert compression.payload_bytes(RecordDict()) == 0
