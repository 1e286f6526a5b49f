"""What ``radfl predict`` says about a classifier beyond its probabilities: the referral
entropy the report's selective-prediction curve bins (``common.selective``) and Grad-CAM maps
(``common.attention``). Both need the model as a plain network of its registered
architecture: an exported program has no layers to hook."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import ensemble
from common.errors import ConfigError


def referral_entropy(
    network: nn.Module, metadata: Mapping[str, Any], source: str, image: torch.Tensor
) -> float:
    """The normalised predictive entropy (0 to 1) of the model's ``uncertainty`` method at
    T = 1, as each site computed it for the report's selective-prediction curve: a study
    above the report's cut-off for a referred share is one the report counted as referred.
    (MC dropout samples the head of a plain network: an exported program cannot.)"""
    from common import selective, uncertainty

    if isinstance(network, ensemble.MeanProbabilities):
        # An ensemble's uncertainty is its members' spread: the entropy of their mean.
        with torch.no_grad():
            mean = torch.softmax(network(image).float(), dim=1)
        return float(selective.normalised_entropy(mean)[0])
    method = str(metadata.get("uncertainty") or "entropy")
    if method not in uncertainty.METHODS:
        raise ConfigError(f"model {source}: unknown uncertainty method {method!r}")
    with torch.no_grad():
        _, sampled = uncertainty.predictive_probabilities(
            explained_network(network, metadata),
            image,
            method,  # type: ignore[arg-type]
        )
    return float(selective.normalised_entropy(sampled)[0])


def write_gradcam(
    network: nn.Module, metadata: Mapping[str, Any], image: torch.Tensor, path: Path
) -> None:
    """The Grad-CAM map of the predicted class over the preprocessed image, as a PNG (the
    middle slice of a volume)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.attention import grad_cam

    cam = grad_cam(explained_network(network, metadata), image)[0, 0].numpy()
    picture = image[0, 0].numpy()
    if picture.ndim == 3:
        middle = picture.shape[2] // 2
        picture, cam = picture[:, :, middle], cam[:, :, middle]
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(picture.T, cmap="gray", origin="lower")
    ax.imshow(cam.T, cmap="jet", alpha=0.4, origin="lower")
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


_EXPLAINED: dict[int, nn.Module] = {}


def explained_network(network: nn.Module, metadata: Mapping[str, Any]) -> nn.Module:
    """The model as a plain network of its registered architecture (Grad-CAM hooks its
    layers by name; an exported program has none), with the logged weights."""
    key = id(network)
    if key not in _EXPLAINED:
        from common.tasks import get_task
        from common.tasks.base import ModelConfig

        config = ModelConfig.of_model(metadata)
        plain = get_task(config).build_model()
        try:
            plain.load_state_dict(network.state_dict())
        except RuntimeError as exc:
            raise ConfigError(
                f"model: its weights do not fit a {config.model} network with "
                f"{config.normalisation} normalisation, as its metadata describes: {exc}"
            ) from exc
        _EXPLAINED[key] = plain.eval()
    return _EXPLAINED[key]
