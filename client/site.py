"""Which site this node is, and its data, from ``node_config`` only.

The hospital decides its facts (name, data location) when it starts its SuperNode; the
coordinator's run config never names a site's data. In Flower's simulation engine a virtual node
has ``partition-id`` and ``num-partitions`` instead: it is then synthetic hospital number
``partition-id`` of ``num-partitions``, generated in memory from the run's seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from client.trainer import LabelledDataset, SampleDataset
from common.config import ClientConfig
from common.errors import ConfigError
from common.splits import TEST, TRAIN, VALIDATION, SplitFractions, assign_splits
from common.synthetic import SiteData, make_site, site_profiles


@dataclass(frozen=True)
class SiteSplits:
    """A site's data divided by patient into training, validation and (optionally) test parts."""

    name: str
    train: LabelledDataset
    validation: LabelledDataset
    test: LabelledDataset | None = None


def site_name(node_config: Mapping[str, Any]) -> str:
    """The site's name: ``site-name`` from node_config, else ``site-<partition-id>``."""
    if "site-name" in node_config:
        return str(node_config["site-name"])
    if "partition-id" in node_config:
        return f"site-{int(node_config['partition-id'])}"
    raise ConfigError("node_config has neither 'site-name' nor 'partition-id'")


# Ray keeps ClientApp actors alive across rounds: generate each synthetic site once per process.
_CACHE: dict[tuple[Any, ...], SiteSplits] = {}


def load_site(node_config: Mapping[str, Any], config: ClientConfig) -> SiteSplits:
    """The site's training and validation data."""
    if "data-path" in node_config:
        raise ConfigError(
            f"node_config data-path={node_config['data-path']!r}: loading a site folder "
            "needs the site data manifest (issue #3); this build runs synthetic sites only"
        )
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ConfigError(
            "node_config must give 'data-path' (a real site) or 'partition-id' and "
            "'num-partitions' (a simulated site)"
        )
    index, count = int(node_config["partition-id"]), int(node_config["num-partitions"])
    key = (
        index,
        count,
        config.model_config,
        config.synthetic_samples_per_site,
        config.validation_fraction,
        config.test_fraction,
    )
    if key not in _CACHE:
        _CACHE[key] = synthetic_site(index, count, config)
    return _CACHE[key]


def synthetic_site(index: int, count: int, config: ClientConfig) -> SiteSplits:
    """Synthetic hospital ``index`` of ``count``, split by patient into train and validation."""
    if not 0 <= index < count:
        raise ConfigError(f"partition-id {index} is outside 0..{count - 1}")
    profile = site_profiles(count, config.synthetic_samples_per_site, config.seed)[index]
    data = make_site(
        profile,
        index=index,
        image_size=config.image_size,
        spatial_dims=config.spatial_dims,
        num_classes=config.num_classes,
        seed=config.seed,
    )
    return split_site(data, split_fractions(config), config.seed)


def split_site(data: SiteData, fractions: SplitFractions, seed: int) -> SiteSplits:
    """Normalise each image (z-score) and split the site by patient (``common.splits``)."""
    images = normalize_intensity(data.images)
    splits = assign_splits(data.patient_ids, seed=seed, fractions=fractions).to_numpy()

    def part(name: str) -> SampleDataset:
        index = torch.from_numpy(splits == name)
        return SampleDataset(images[index], data.labels[index])

    return SiteSplits(
        name=data.profile.name, train=part(TRAIN), validation=part(VALIDATION), test=part(TEST)
    )


def split_fractions(config: ClientConfig) -> SplitFractions:
    train = 1.0 - config.validation_fraction - config.test_fraction
    return SplitFractions(train, config.validation_fraction, config.test_fraction)


def normalize_intensity(images: torch.Tensor) -> torch.Tensor:
    """Per-image zero mean, unit variance: removes most of a scanner's gain and offset."""
    dims = tuple(range(1, images.ndim))
    mean = images.mean(dim=dims, keepdim=True)
    std = images.std(dim=dims, keepdim=True).clamp(min=1e-6)
    return (images - mean) / std
