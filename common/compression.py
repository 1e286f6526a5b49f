"""Compressed model updates: what a site sends back after local training.

A site sends its *update* (its trained weights minus the global model it received) instead of
the weights themselves, compressed with the run's ``update-compression``:

- ``none``: the trained weights as they are (float32);
- ``fp16``: the update in half precision (half the bytes);
- ``int8``: the update quantised to 8 bits with one float32 scale per output channel (per row
  of the first axis; one per tensor for vectors), then deflated (zlib): a quarter of the bytes
  from quantisation, less again because most quantised values of an update are small.

Compression error is not lost: the site keeps what quantisation dropped (error feedback; Seide
et al., 2014; Karimireddy et al., 2019) and adds it to its next update, so over rounds every
site's full update reaches the server. Integer buffers (BatchNorm's batch counters) travel
unchanged. The server decodes each reply against the global model of the round
(:func:`decode`) before checking and aggregating it, so the rest of the server never sees a
compressed update.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Final

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common import messages as keys
from common.config import UPDATE_COMPRESSIONS as METHODS
from common.errors import ConfigError

#: ConfigRecord in a training reply naming the compression of its arrays (absent: none).
COMPRESSION: Final = "radfl.compression"
#: ArrayRecord in a training reply holding the int8 scales, by the key of the array they scale.
SCALES: Final = "radfl.scales"
_METHOD: Final = "method"
_INT8_MAX: Final = 127.0
_DEFLATE_LEVEL: Final = 6


def encode(
    trained: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    method: str,
    residual: Mapping[str, np.ndarray] | None = None,
) -> tuple[RecordDict, dict[str, np.ndarray]]:
    """The reply records of ``trained`` weights against the ``reference`` (global) weights,
    and the new error-feedback residual to keep at the site for the next round.

    Returns ``({ARRAYS: ArrayRecord, COMPRESSION: ..., SCALES: ...}, residual)``; the
    caller puts the records into its reply. ``residual`` is what the previous rounds'
    compression dropped (float32, by key); keys it lacks start from zero.
    """
    if method not in METHODS:
        raise ConfigError(f"update-compression must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "none":
        return RecordDict({keys.ARRAYS: _record(trained)}), {}
    residual = residual or {}
    payload: dict[str, np.ndarray] = {}
    scales: dict[str, np.ndarray] = {}
    kept: dict[str, np.ndarray] = {}
    for key, value in trained.items():
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating):
            payload[key] = value
            continue
        delta = value.astype(np.float32) - np.asarray(reference[key], dtype=np.float32)
        if key in residual and residual[key].shape == delta.shape:
            delta = delta + residual[key]
        if method == "fp16":
            sent = delta.astype(np.float16)
            payload[key] = sent
            kept[key] = delta - sent.astype(np.float32)
        else:
            quantised, scale = _quantise(delta)
            payload[key], scales[key] = _deflate(quantised), scale
            kept[key] = delta - _dequantise(quantised, scale)
    records = RecordDict(
        {
            keys.ARRAYS: _record(payload),
            COMPRESSION: ConfigRecord({_METHOD: method}),
        }
    )
    if scales:
        records[SCALES] = _record(scales)
    return records, kept


def decode(content: RecordDict, reference: ArrayRecord) -> ArrayRecord:
    """The full weights a (possibly compressed) reply stands for, given the round's global
    ``reference``; each with the reference's dtype and shape. A reply with no compression
    record is returned as it is. Raises ``ValueError`` naming the array that does not fit."""
    arrays = keys.array_record(content)
    marker = content.get(COMPRESSION)
    if not isinstance(marker, ConfigRecord):
        return arrays
    method = str(marker.get(_METHOD, ""))
    if method not in METHODS or method == "none":
        raise ValueError(f"unknown update compression {method!r}")
    scales_record = content.get(SCALES)
    scales = scales_record if isinstance(scales_record, ArrayRecord) else ArrayRecord()
    out = ArrayRecord()
    for key in arrays:
        value = arrays[key].numpy()
        if key not in reference:
            out[key] = Array(np.array(value, order="C"))  # the reply check names it
            continue
        base = reference[key].numpy()
        if not np.issubdtype(base.dtype, np.floating):
            out[key] = Array(np.array(value, order="C"))
            continue
        if method == "int8":
            if value.dtype != np.uint8 or value.ndim != 1 or key not in scales:
                raise ValueError(f"{key}: int8 update without its deflated values and scales")
            scale = scales[key].numpy()
            if scale.shape != _scale_shape(base.shape):
                raise ValueError(f"{key}: int8 scales of shape {list(scale.shape)}")
            delta = _dequantise(_inflate(value, base.shape, key), scale)
        else:
            if value.shape != base.shape:
                raise ValueError(
                    f"{key}: update of shape {list(value.shape)}, model {list(base.shape)}"
                )
            if value.dtype != np.float16:
                raise ValueError(f"{key}: fp16 update of dtype {value.dtype}")
            delta = value.astype(np.float32)
        out[key] = Array(np.array((base.astype(np.float32) + delta).astype(base.dtype), order="C"))
    return out


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the arrays a reply carries (weights or compressed update, and scales)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(record[key].data) for key in record)
    return total


def _quantise(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 values and float32 scales, one per row of the first axis."""
    rows = delta.reshape(delta.shape[0], -1) if delta.ndim >= 2 else delta.reshape(1, -1)
    peak = np.abs(rows).max(axis=1) if rows.size else np.zeros(rows.shape[0], np.float32)
    scale = np.where(peak > 0, peak / _INT8_MAX, 1.0).astype(np.float32)
    quantised = np.clip(np.rint(rows / scale[:, None]), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return quantised.reshape(delta.shape), scale.reshape(_scale_shape(delta.shape))


def _deflate(quantised: np.ndarray) -> np.ndarray:
    return np.frombuffer(zlib.compress(quantised.tobytes(), _DEFLATE_LEVEL), dtype=np.uint8)


def _inflate(packed: np.ndarray, shape: tuple[int, ...], key: str) -> np.ndarray:
    """The int8 values of ``shape``; never inflates more than that (a hostile payload cannot
    exhaust the server's memory)."""
    size = int(np.prod(shape))
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(packed.tobytes(), size)
    except zlib.error as exc:
        raise ValueError(f"{key}: int8 update is not valid deflate data ({exc})") from None
    if len(raw) != size or inflater.unconsumed_tail or not inflater.eof:
        raise ValueError(f"{key}: int8 update holds other than the {size} values of the model")
    return np.frombuffer(raw, dtype=np.int8).reshape(shape)


def _dequantise(quantised: np.ndarray, scale: np.ndarray) -> np.ndarray:
    rows = quantised.reshape(scale.size, -1).astype(np.float32) * scale.reshape(-1, 1)
    return rows.reshape(quantised.shape)


def _scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0],) if len(shape) >= 2 else (1,)


def _record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.array(value, order="C")) for key, value in arrays.items()})
