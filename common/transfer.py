"""Transfer learning: a weights file checked before it becomes a federation's first global model,
the network's classification head, and a freezing schedule by layer name.

The file is read with ``torch.load(weights_only=True)``: a plain mapping of names to tensors,
nothing a pickle could run. Before it is used, it must be what its owner vetted (its SHA-256),
every layer must be one the network has, of the same shape, with finite values, and every layer
the network has must be in it; the one exception is the *head*, which starts fresh when the
class count differs.

The head of a network is found, not listed: the layers whose shapes change when the network is
built for one more class (``head_layers``). For the registered families that is ``fc`` (the
ResNets and ``small-cnn``), ``class_layers.out`` (DenseNet-121), ``_fc`` (EfficientNet-B0), the
last convolutions (``unet``'s ``model.2``, ``segresnet``'s ``conv_final.2``, ``dynunet``'s
``output_block``), RetinaNet's ``classification_head.cls_logits`` and, for Retina U-Net, that
and ``segmentation_head.3``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import ConfigError
from common.tasks import get_task
from common.tasks.base import ModelConfig

#: Bytes read at a time when hashing a weights file.
_CHUNK_BYTES = 1 << 20


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, as ``sha256sum`` prints it."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, *, what: str = "initial-weights") -> str:
    """The file's SHA-256, refused by name unless it equals ``expected`` (case-insensitive)."""
    actual = sha256_of(path)
    wanted = expected.strip().lower()
    if len(wanted) != 64 or any(c not in "0123456789abcdef" for c in wanted):
        raise ConfigError(f"{what}-sha256 must be 64 hexadecimal digits, got {expected!r}")
    if actual != wanted:
        raise ConfigError(
            f"{what} {path}: checksum mismatch, its SHA-256 is {actual} but {wanted} was "
            "expected: the file is not the one that was vetted; refused"
        )
    return actual


def load_weights_file(path: Path, *, what: str = "initial-weights") -> dict[str, torch.Tensor]:
    """A state dict from ``path`` by ``torch.load(weights_only=True)``: names to tensors only.

    Raises
    ------
    ConfigError
        Naming the file, if it is missing, holds anything but a mapping of names to tensors, or
        carries a pickle payload that weights-only loading refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path}: no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{what} {path}: not a plain state dict of tensors (weights-only loading "
            f"refused it: {first})"
        ) from exc
    if not isinstance(loaded, Mapping) or not loaded:
        raise ConfigError(
            f"{what} {path}: holds a {type(loaded).__name__}, not a mapping of layer "
            "names to tensors"
        )
    state: dict[str, torch.Tensor] = {}
    for name, value in loaded.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ConfigError(
                f"{what} {path}: entry {name!r} is a {type(value).__name__}, not a tensor"
            )
        state[name] = value
    return state


def head_layers(config: ModelConfig) -> set[str]:
    """The state-dict keys of the network's head: those whose shape depends on the class count.

    Found by building the network for ``num_classes`` and ``num_classes + 1`` (in a forked random
    state, so the caller's is untouched) and comparing shapes.
    """
    with torch.random.fork_rng():
        ours = get_task(config).build_model().state_dict()
        wider = dataclasses.replace(config, num_classes=config.num_classes + 1)
        other = get_task(wider).build_model().state_dict()
    return {k for k, v in ours.items() if k in other and other[k].shape != v.shape}


@dataclasses.dataclass(frozen=True)
class AdaptedWeights:
    """Weights ready for ``model.load_state_dict``, and the head layers that start fresh."""

    state: dict[str, torch.Tensor]
    replaced_head: tuple[str, ...]


def adapt_weights(
    state: Mapping[str, torch.Tensor],
    model: nn.Module,
    head: set[str],
    *,
    source: str,
) -> AdaptedWeights:
    """Check ``state`` against ``model`` layer by layer; the head's layers start fresh where
    the class count differs.

    Raises
    ------
    ConfigError
        Naming the layers: missing or unknown to the network, of another shape (outside the
        head), of another dtype kind, or holding NaN or infinite values.
    """
    target = model.state_dict()
    unknown = sorted(set(state) - set(target))
    missing = sorted(set(target) - set(state))
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"layers the network lacks: {_names(unknown)}")
        if missing:
            parts.append(f"layers the file lacks: {_names(missing)}")
        raise ConfigError(f"initial-weights {source} does not fit the network; " + "; ".join(parts))
    mismatched = sorted(k for k, v in state.items() if tuple(v.shape) != tuple(target[k].shape))
    outside_head = [k for k in mismatched if k not in head]
    if outside_head:
        shown = ", ".join(
            f"{k} {tuple(state[k].shape)} != {tuple(target[k].shape)}" for k in outside_head[:5]
        )
        raise ConfigError(
            f"initial-weights {source}: shape mismatch in layer(s) outside the head: {shown}"
            f"{' ...' if len(outside_head) > 5 else ''}"
        )
    replaced = tuple(mismatched)
    adapted: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name in replaced:
            adapted[name] = target[name].clone()
            continue
        if value.is_floating_point() != target[name].is_floating_point():
            raise ConfigError(
                f"initial-weights {source}: layer {name} is {value.dtype}, the network's "
                f"{target[name].dtype}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ConfigError(
                f"initial-weights {source}: layer {name} holds NaN or infinite values"
            )
        adapted[name] = value.to(target[name].dtype)
    return AdaptedWeights(adapted, replaced)


def _names(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def freeze_patterns(spec: str) -> tuple[str, ...]:
    """The ``freeze-layers`` patterns (comma-separated ``fnmatch`` patterns on parameter names)."""
    return tuple(p.strip() for p in spec.split(",") if p.strip())


def frozen_parameters(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Names of the parameters matching any of ``patterns``; a pattern matching none is refused
    by name (a typo would otherwise freeze nothing, silently)."""
    names = [name for name, _ in model.named_parameters()]
    matched: set[str] = set()
    for pattern in patterns:
        hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            raise ConfigError(
                f"run-config key freeze-layers: pattern {pattern!r} matches no parameter of the "
                f"network (e.g. {', '.join(names[:3])})"
            )
        matched |= hits
    return [n for n in names if n in matched]


#: A parameter group's factor on the scheduled learning rate (``unfreeze-lr-factor``).
LR_SCALE = "lr_scale"


@dataclass(frozen=True)
class Freezing:
    """This round's share of the freezing schedule (``freeze-layers``, ``freeze-rounds``).

    In the first ``freeze-rounds`` rounds the parameters matching ``freeze-layers`` get no
    gradient and no optimizer step (weight decay included), and the running statistics of
    normalisation layers whose parameters are all frozen stay as they came; afterwards those
    parameters train at ``unfreeze-lr-factor`` times the scheduled learning rate.
    """

    names: frozenset[str]
    frozen: bool
    lr_factor: float

    @classmethod
    def for_round(
        cls,
        model: nn.Module,
        freeze_layers: str,
        freeze_rounds: int,
        unfreeze_lr_factor: float,
        server_round: int,
    ) -> Freezing:
        """The schedule's state in ``server_round``, applied to ``model`` (frozen parameters
        stop requiring gradients until :meth:`release`)."""
        patterns = freeze_patterns(freeze_layers)
        names = frozenset(frozen_parameters(model, patterns)) if patterns else frozenset()
        freezing = cls(names, bool(names) and server_round <= freeze_rounds, unfreeze_lr_factor)
        if freezing.frozen:
            for name, parameter in model.named_parameters():
                if name in names:
                    parameter.requires_grad_(False)
        return freezing

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trained:
            raise ConfigError(
                "run-config key freeze-layers freezes every parameter of the network: nothing "
                "would train in the first freeze-rounds rounds"
            )
        if self.frozen or not self.names or self.lr_factor == 1.0:
            return [{"params": [p for _, p in trained]}]
        return [
            {"params": [p for n, p in trained if n not in self.names]},
            {"params": [p for n, p in trained if n in self.names], LR_SCALE: self.lr_factor},
        ]

    def hold_statistics(self, model: nn.Module) -> None:
        """Frozen normalisation layers in eval mode: their running statistics stay."""
        if not self.frozen:
            return
        for prefix, module in model.named_modules():
            own = [
                f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)
            ]
            if (
                isinstance(module, nn.modules.batchnorm._NormBase)
                and own
                and set(own) <= self.names
            ):
                module.eval()

    def release(self, model: nn.Module) -> None:
        """Every parameter trainable again (the model outlives the round in ``radfl
        centralized``)."""
        if self.frozen:
            for name, parameter in model.named_parameters():
                if name in self.names:
                    parameter.requires_grad_(True)
