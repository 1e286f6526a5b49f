"""Synthetic hospitals: sites whose scanners, case mix and size differ, generated in memory.

Each image is an anatomical-looking background (an elliptical body with soft internal structure
and low-frequency texture) with or without a lesion-like object (a small blob brighter than its
surroundings). For more than two classes, class ``k >= 1`` is a lesion of kind ``k``: kinds differ
in size, contrast and elongation. Sites differ the way real scanners and referral patterns do:
intensity scale and offset, noise, blur, prevalence of findings, and number of cases. The
generator is deterministic in ``(seed, site index)`` so every process that asks for site ``i``
builds the same data without any of it being sent anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.networks.layers import GaussianFilter

from common.errors import ConfigError


@dataclass(frozen=True)
class SiteProfile:
    """How one synthetic hospital's scanner and case mix look."""

    name: str
    num_samples: int
    prevalence: float
    intensity_scale: float
    intensity_offset: float
    noise_std: float
    blur_sigma: float


@dataclass(frozen=True)
class SiteData:
    """A site's images ``(N, 1, *spatial)`` (float32), labels ``(N,)`` and patient ids."""

    profile: SiteProfile
    images: torch.Tensor
    labels: torch.Tensor
    patient_ids: list[str]


def site_profiles(num_sites: int, samples_per_site: int, seed: int) -> list[SiteProfile]:
    """Profiles of ``num_sites`` hospitals, deterministic in ``seed``.

    Sizes range from about half to one and a half times ``samples_per_site``; prevalence from
    0.2 to 0.6; scanners differ in gain, offset, noise and blur.
    """
    if num_sites < 1:
        raise ConfigError(f"num_sites must be >= 1, got {num_sites}")
    if samples_per_site < 8:
        raise ConfigError(f"samples_per_site must be >= 8, got {samples_per_site}")
    rng = np.random.default_rng([seed, 7919])
    profiles = []
    for index in range(num_sites):
        spread = index / max(num_sites - 1, 1)
        profiles.append(
            SiteProfile(
                name=f"site-{index}",
                num_samples=max(8, int(round(samples_per_site * (0.6 + 0.8 * rng.random())))),
                prevalence=float(0.2 + 0.4 * spread),
                intensity_scale=float(rng.uniform(0.7, 1.4)),
                intensity_offset=float(rng.uniform(-0.2, 0.2)),
                noise_std=float(rng.uniform(0.04, 0.12)),
                blur_sigma=float(rng.uniform(0.0, 1.2)),
            )
        )
    return profiles


def make_site(
    profile: SiteProfile,
    *,
    index: int,
    image_size: int,
    spatial_dims: int,
    num_classes: int,
    seed: int,
) -> SiteData:
    """Generate one site's images and labels."""
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if image_size < 16:
        raise ConfigError(f"image_size must be >= 16, got {image_size}")
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + index)
    n = profile.num_samples
    has_finding = torch.rand(n, generator=generator) < profile.prevalence
    kinds = torch.randint(1, num_classes, (n,), generator=generator)
    labels = torch.where(has_finding, kinds, torch.zeros_like(kinds))

    grid = torch.stack(
        torch.meshgrid(*[torch.linspace(-1, 1, image_size)] * spatial_dims, indexing="ij")
    )  # (D, *shape)
    images = torch.cat(
        [
            _bodies(grid, len(chunk), generator) + _lesions(grid, labels[chunk], generator)
            for chunk in torch.arange(n).split(_CHUNK)
        ]
    ).unsqueeze(1)
    if profile.blur_sigma > 0:
        blur = GaussianFilter(spatial_dims, sigma=profile.blur_sigma * image_size / 64)
        images = blur(images)
    images = images * profile.intensity_scale + profile.intensity_offset
    images += profile.noise_std * torch.randn(images.shape, generator=generator)
    # One image per patient here; on-disk sites (issue #3) add follow-up studies.
    patient_ids = [f"{profile.name}-p{i:05d}" for i in range(n)]
    return SiteData(profile, images.float(), labels.long(), patient_ids)


_CHUNK = 64  # images generated at once: bounds memory for 3D volumes


def _bodies(grid: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` elliptical bodies with two soft "organs" and a low-frequency texture."""
    dims = grid.shape[0]
    g = grid.unsqueeze(0)  # (1, D, *shape)
    radii = _per_image(0.65 + 0.2 * torch.rand(n, dims, generator=generator), dims)
    center = _per_image(0.08 * (torch.rand(n, dims, generator=generator) - 0.5), dims)
    body = torch.sigmoid((1 - (((g - center) / radii) ** 2).sum(1)) * 12) * 0.5
    inside = body > 0.05
    for _ in range(2):
        c = _per_image((torch.rand(n, dims, generator=generator) - 0.5) * 0.8, dims)
        s = (0.15 + 0.2 * torch.rand(n, generator=generator)).view(n, *[1] * dims)
        d2 = ((g - c) ** 2).sum(1)
        body = body + 0.15 * torch.exp(-d2 / (2 * s**2)) * inside
    phase = _per_image(2 * math.pi * torch.rand(n, dims, generator=generator), dims)
    texture = torch.sin(3 * g + phase).mean(1)
    return body + 0.05 * texture * body


def _lesions(grid: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Lesion-like blobs for labels > 0 (zero images elsewhere); kind sets size and shape."""
    n, dims = len(labels), grid.shape[0]
    g = grid.unsqueeze(0)
    kind = labels.float().view(n, *[1] * dims)
    center = _per_image((torch.rand(n, dims, generator=generator) - 0.5) * 0.9, dims)
    radius = 0.06 + 0.02 * kind + 0.04 * torch.rand(n, generator=generator).view_as(kind)
    stretch = torch.ones(n, dims)
    stretch[:, 0] = 1.0 + 0.6 * (labels.float() - 1).clamp(min=0)
    d2 = (((g - center) / _per_image(stretch, dims)) ** 2).sum(1)
    contrast = 0.15 + 0.1 * torch.rand(n, generator=generator).view_as(kind)
    return (labels > 0).float().view_as(kind) * contrast * torch.exp(-d2 / (2 * radius**2))


def _per_image(values: torch.Tensor, dims: int) -> torch.Tensor:
    """``(n, D)`` parameters shaped to broadcast against ``(n, D, *spatial)``."""
    return values.view(*values.shape, *[1] * dims)
