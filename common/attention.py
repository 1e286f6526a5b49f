"""Attention inside the lesion: the share of a Grad-CAM map's mass on the ground-truth lesion.

Grad-CAM (Selvaraju et al., "Grad-CAM: visual explanations from deep networks via
gradient-based localization", ICCV 2017), as MONAI's ``monai.visualize.GradCAM``, on the
network's last convolution, for the predicted class, upsampled to the image. For a case whose
lesion mask is known (synthetic sites: the generator's masks; real sites: a manifest ``mask``
column), its share is ``sum(cam * mask) / sum(cam)``; a model that decides by the lesion puts
most of its mass there, one that learned a shortcut (a scanner border, a marker) does not.

The summable state of a population is ``[cases, sum of shares, sum of squared shares]``; the
report shows the mean share with a normal-approximation interval (the shares' standard
deviation over the square root of the cases).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from common.intervals import MetricWithCI, check_alpha, z_value

#: Grad-CAM's layer is the last convolution whose maps are at least this many voxels on a side:
#: the last one of a ResNet at 64 px is 2 x 2, too coarse to tell a lesion from a corner.
MIN_MAP_SIDE = 4


def cam_layer(model: nn.Module, images: torch.Tensor) -> str:
    """The name of Grad-CAM's target layer for ``images``: the network's last convolution
    whose output is at least :data:`MIN_MAP_SIDE` on every spatial axis (else its last)."""
    sides: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):

            def record(_: nn.Module, __: object, out: torch.Tensor, name: str = name) -> None:
                sides[name] = min(out.shape[2:])

            hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for hook in hooks:
            hook.remove()
    if not sides:
        raise ValueError(f"{type(model).__name__} has no convolution for Grad-CAM")
    fine = [name for name, side in sides.items() if side >= MIN_MAP_SIDE]
    return fine[-1] if fine else list(sides)[-1]


def grad_cam(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps ``(N, 1, *spatial)`` (non-negative, not rescaled: only their shares
    matter) of the predicted class of each image (gradients enabled here, whatever the
    caller's mode; the model's mode is kept)."""
    from monai.visualize import GradCAM

    images = images.detach().float()
    # Full precision: MONAI's Grad-CAM goes through NumPy, which has no bfloat16.
    with torch.autocast(images.device.type, enabled=False):
        cam = GradCAM(
            nn_module=model, target_layers=cam_layer(model, images), postprocessing=_identity
        )
        with torch.enable_grad():
            maps = cam(images.requires_grad_(True))
    return torch.nan_to_num(maps.detach().float(), nan=0.0).clamp(min=0.0)


def _identity(maps: torch.Tensor) -> torch.Tensor:
    return maps


def share_inside(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per case, the share of map mass inside the mask (``> 0``); NaN for a case without a
    lesion voxel or without map mass."""
    dims = tuple(range(1, maps.ndim))
    inside = (maps * (masks > 0).to(maps.dtype)).sum(dim=dims)
    total = maps.sum(dim=dims)
    has_lesion = (masks > 0).flatten(1).any(dim=1)
    share = inside / total.clamp(min=1e-12)
    return torch.where(has_lesion & (total > 0), share, torch.full_like(share, math.nan))


def attention_summary(state: np.ndarray, alpha: float) -> MetricWithCI:
    """The mean share with its ``1 - alpha`` interval, from ``[cases, sum, sum of squares]``."""
    cases, total, squares = (float(v) for v in state)
    n = int(round(cases))
    if n == 0:
        return MetricWithCI("attention_in_lesion", math.nan, math.nan, math.nan, "normal", 0)
    mean = total / cases
    if n < 2:
        return MetricWithCI("attention_in_lesion", mean, math.nan, math.nan, "normal", n)
    variance = max(0.0, (squares - cases * mean**2) / (cases - 1))
    half = z_value(check_alpha(alpha)) * math.sqrt(variance / cases)
    return MetricWithCI(
        "attention_in_lesion", mean, max(0.0, mean - half), min(1.0, mean + half), "normal", n
    )
