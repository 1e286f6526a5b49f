"""A checkpoint after every round, and resuming a stopped or crashed run from it.

The checkpoint of run ``run-key`` is ``checkpoint-dir/<run-key>/checkpoint.pt`` (an absolute
path: a relative one would resolve in the SuperLink's working directory). It holds the global
model after the round, the strategy's own state (FedAdam/FedYogi moments, FedAvgM momentum),
the round number, the recorder's state (best model, per-site rows, rejections), the random
states and the MLflow run id. It is written to a temporary file and renamed, so a crash while
writing leaves the previous checkpoint intact.

``resume = true`` (``radfl simulate --resume RUN_KEY``) continues from it into the same MLflow
run: the rounds after the checkpoint run under their own numbers, so no round is repeated or
missing.
"""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import ConfigError

NAME = "checkpoint.pt"
#: Strategy attributes that carry state from round to round (Flower's FedOpt and FedAvgM).
STRATEGY_STATE = ("current_arrays", "m_t", "v_t", "momentum_vector")


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
    return folder / run_key / NAME


def strategy_state(strategy: Any) -> dict[str, Any]:
    return {
        name: copy.deepcopy(getattr(strategy, name))
        for name in STRATEGY_STATE
        if getattr(strategy, name, None) is not None
    }


def restore_strategy(strategy: Any, state: dict[str, Any]) -> None:
    for name, value in state.items():
        setattr(strategy, name, value)


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
    """Write ``payload`` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"resume: no checkpoint at {path} (wrong run-key or checkpoint-dir?)")
    # Written by this ServerApp only (tensors, arrays and plain Python state).
    return dict(torch.load(path, weights_only=False))
