"""A checkpoint after every round, and resuming a stopped or crashed run from it.

The checkpoint of run ``run-key`` is ``checkpoint-dir/<run-key>/checkpoint.pt`` (an absolute
path: a relative one would resolve in the SuperLink's working directory). It holds the global
model after the round, the strategy's own state (FedAdam/FedYogi moments, FedAvgM momentum),
the round number, the recorder's state (best model, per-site rows, rejections), the random
states and the MLflow run id.

It is written to a temporary file of its own (``tempfile`` in the same folder), flushed to disk,
renamed over the previous one and the folder flushed too, so a crash or power loss while writing
leaves the previous checkpoint intact. The run key is a plain name (letters, digits, ``.``, ``_``,
``-``), so it cannot point outside ``checkpoint-dir``. Everything is stored as tensors and plain
Python values (NumPy arrays and Flower ``ArrayRecord``s as tensors) so that loading uses
``torch.load(weights_only=True)``: a planted file whose unpickling would run code is refused.

``resume = true`` (``radfl simulate --resume RUN_KEY``) continues from it into the same MLflow
run: the rounds after the checkpoint run under their own numbers, so no round is repeated or
missing.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from common.errors import ConfigError
from server.strategy_mixins import checkpointable

NAME = "checkpoint.pt"
#: A run key names a folder: a plain name, never a path (``..``, ``/``) or an empty string.
RUN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Markers of values stored as tensors and turned back on loading.
_NDARRAY = "__radfl-ndarray__"
_ARRAY_RECORD = "__radfl-array-record__"


def validate_run_key(run_key: str) -> str:
    """``run_key`` if it is a safe folder name, else a ``ConfigError`` naming it."""
    if not RUN_KEY.fullmatch(run_key):
        raise ConfigError(
            f"run-config key run-key must be a plain name (letters, digits, '.', '_', '-', "
            f"starting with a letter or digit, at most 128 characters), got {run_key!r}"
        )
    return run_key


def checkpoint_path(checkpoint_dir: str, run_key: str) -> Path:
    if not checkpoint_dir:
        raise ConfigError("run-config key checkpoint-dir is empty: there is nowhere to checkpoint")
    folder = Path(checkpoint_dir)
    if not folder.is_absolute():
        raise ConfigError(
            f"run-config key checkpoint-dir must be an absolute path, got {checkpoint_dir!r}"
        )
    if not run_key:
        raise ConfigError("checkpoints need a run-key")
    return folder / validate_run_key(run_key) / NAME


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The strategy's own state (``state_dict`` of ``server.strategy_mixins.CheckpointMixin``)."""
    return checkpointable(strategy).state_dict()


def restore_strategy(strategy: Any, state: dict[str, Any]) -> None:
    checkpointable(strategy).load_state_dict(state)


def random_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def restore_random_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically and durably: own temporary file, fsync, rename, fsync folder."""
    stored = _to_storable(payload, "checkpoint")  # fails before anything is written
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(stored, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    # The rename is durable only once the folder's entry is on disk too.
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"resume: no checkpoint at {path} (wrong run-key or checkpoint-dir?)")
    try:
        stored = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        # torch names the offending global ("Unsupported global: GLOBAL posix.system").
        reason = next((line for line in str(exc).splitlines() if "global" in line.lower()), "")
        raise ConfigError(
            f"resume: refused to load checkpoint {path}: it holds objects other than tensors "
            f"and plain values, and unpickling them could run code. {reason.strip()}"
        ) from None
    if not isinstance(stored, dict):
        raise ConfigError(f"resume: checkpoint {path} is not a RadFL checkpoint")
    return dict(_from_storable(stored))


def _to_storable(value: Any, where: str) -> Any:
    """``value`` as tensors and plain Python values, which ``weights_only`` loading accepts."""
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass
        return value.item()
    if value is None or isinstance(value, bool | int | float | str | bytes | torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"checkpoint: {where} is an object array; store numbers only")
        return {_NDARRAY: torch.from_numpy(np.array(value))}
    if isinstance(value, ArrayRecord):
        return {_ARRAY_RECORD: dict(value.to_torch_state_dict())}
    if isinstance(value, dict):
        return {key: _to_storable(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, list | tuple):
        items = [_to_storable(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"checkpoint: {where} is a {type(value).__name__}; only tensors, arrays and plain "
        "values are stored (so that loading never unpickles code)"
    )


def _from_storable(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_NDARRAY}:
            return value[_NDARRAY].numpy()
        if set(value) == {_ARRAY_RECORD}:
            return ArrayRecord(value[_ARRAY_RECORD])
        return {key: _from_storable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        items = [_from_storable(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return value
