"""Ensembles of RadFL models: the mean of their probabilities, and the folder that holds one.

:class:`MeanProbabilities` is a network whose output, through the softmax every task of
class probabilities applies (classification per image, segmentation per voxel), is the mean of
its members' probabilities: it returns the logarithm of that mean, and ``softmax(log p) = p``.
So an ensemble is evaluated, reported and served by the code that serves one model.

An ensemble folder (``radfl ensemble --out``, read by ``radfl predict``) holds
``ensemble.json`` (the RadFL metadata of a logged model, ``server.tracking.model_metadata``,
with the ensemble's own operating threshold; each member's weights file and SHA-256) and the
members' state dicts. Every file is checked against its hash and loaded weights-only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import ConfigError
from common.tasks import get_task
from common.tasks.base import ModelConfig
from common.transfer import load_weights_file, sha256_of, verify_sha256

#: The file describing an ensemble folder.
ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_VERSION = 1
#: Metadata every member must share to be averaged: same task, inputs and classes.
SHARED_METADATA = ("task", "spatial_dims", "image_size", "num_classes", "ct_window_hu")
#: Tasks whose networks give class logits on axis 1 (the mean of probabilities is defined).
ENSEMBLE_TASKS = ("classification", "segmentation")
#: Probabilities are clamped here before the logarithm, so that a class every member rules
#: out gets a large negative logit instead of minus infinity.
_TINY = 1e-12


class MeanProbabilities(nn.Module):
    """The members' mean softmax probability over axis 1, returned as its logarithm.

    Parameters
    ----------
    members
        Networks mapping the same input to logits of the same shape.
    temperatures
        Each member's calibration temperature (its logits are divided by it); 1 by default.
    """

    def __init__(
        self, members: Sequence[nn.Module], temperatures: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        if not members:
            raise ConfigError("an ensemble needs at least one member")
        temps = list(temperatures) if temperatures is not None else [1.0] * len(members)
        if len(temps) != len(members) or any(t <= 0 for t in temps):
            raise ConfigError("an ensemble needs one positive temperature per member")
        # A logged model may load as an exported program's callable rather than a Module.
        self.members: nn.ModuleList | tuple[Any, ...] = (
            nn.ModuleList(members)
            if all(isinstance(m, nn.Module) for m in members)
            else tuple(members)
        )
        self.temperatures = temps

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for member, temperature in zip(self.members, self.temperatures, strict=True):
            probabilities = torch.softmax(member(image).float() / temperature, dim=1)
            total = probabilities if total is None else total + probabilities
        assert total is not None  # at least one member (checked in __init__)
        return torch.log((total / len(self.members)).clamp_min(_TINY))


def shared_metadata(
    sources: Sequence[str], metadata: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The ensemble's metadata: the first member's, refused by name where a member differs in
    what averaging needs (:data:`SHARED_METADATA`); no threshold (a member's was chosen for it
    alone) and temperature 1 (each member's is applied inside the ensemble)."""
    first = metadata[0]
    if first.get("task") not in ENSEMBLE_TASKS:
        raise ConfigError(
            f"model {sources[0]}: task {first.get('task')!r} has no mean of probabilities; "
            f"ensembles take {', '.join(ENSEMBLE_TASKS)}"
        )
    for source, other in zip(sources[1:], metadata[1:], strict=True):
        differing = [k for k in SHARED_METADATA if other.get(k) != first.get(k)]
        if differing:
            raise ConfigError(
                f"model {source} differs from {sources[0]} in {', '.join(differing)}: it cannot "
                "join the ensemble"
            )
    return {**first, "threshold": None, "temperature": 1.0}


def write_folder(
    folder: Path,
    metadata: Mapping[str, Any],
    members: Mapping[str, Mapping[str, torch.Tensor]],
) -> Path:
    """Write an ensemble folder: ``members`` (name to state dict) and ``metadata``."""
    folder.mkdir(parents=True, exist_ok=True)
    described = []
    for index, (name, state) in enumerate(members.items()):
        path = folder / f"member-{index}.pt"
        torch.save(dict(state), path)
        described.append({"name": name, "weights": path.name, "sha256": sha256_of(path)})
    document = {"version": ENSEMBLE_VERSION, "radfl": dict(metadata), "members": described}
    (folder / ENSEMBLE_FILE).write_text(json.dumps(document, indent=2))
    return folder


def is_folder(source: str) -> bool:
    """Whether ``source`` is an ensemble folder."""
    return (Path(source).expanduser() / ENSEMBLE_FILE).is_file()


def read_folder(folder: Path) -> tuple[MeanProbabilities, dict[str, Any]]:
    """The ensemble of a folder (eval mode, CPU) and its metadata; a member whose file does not
    match its recorded SHA-256, or does not fit the network, is refused by name."""
    folder = Path(folder).expanduser()
    description = folder / ENSEMBLE_FILE
    try:
        document = json.loads(description.read_text())
        metadata = dict(document["radfl"])
        described = list(document["members"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"ensemble {description}: unreadable ({exc})") from exc
    if document.get("version") != ENSEMBLE_VERSION:
        raise ConfigError(
            f"ensemble {description}: version {document.get('version')!r} is not {ENSEMBLE_VERSION}"
        )
    config = ModelConfig.of_model(metadata)
    networks = []
    for member in described:
        path = folder / Path(str(member["weights"])).name
        verify_sha256(path, str(member["sha256"]), what=f"ensemble member {member['name']}")
        network = get_task(config).build_model()
        try:
            network.load_state_dict(load_weights_file(path, what="ensemble member"))
        except RuntimeError as exc:
            raise ConfigError(
                f"ensemble member {path}: does not fit {config.model}: {exc}"
            ) from exc
        networks.append(network.eval())
    return MeanProbabilities(networks).eval(), metadata
