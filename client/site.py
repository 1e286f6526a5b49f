"""Which site this node is, and its data, from ``node_config`` only.

The hospital decides its facts when it starts its SuperNode; the coordinator's run config never
names a site's data. ``node_config`` keys a site may set:

================  ==========================================================================
``site-name``     the name reported with the site's metrics (default: the data folder's name)
``data-path``     the site folder holding ``manifest.csv`` and its images (``common.manifest``)
``cache-path``    where decoded images and check reports are cached (default
                  ``DATA-PATH/.radfl-cache``)
``skip-bad-rows`` ``true`` to train on the rows that pass the site check, reporting the others;
                  by default a site whose check fails refuses to train, with the same messages
                  ``radfl site check`` prints
``split-seed``    seed of the patient-hash train/validation/test split (default 0)
``log-path``      the site's log file, where the ClientApp writes what it logs and the full
                  text of its errors (default ``DATA-PATH/.radfl-logs/clientapp.log``); the
                  coordinator only learns an error's code and category (``client.failures``)
================  ==========================================================================

In Flower's simulation engine a virtual node has only ``partition-id`` and ``num-partitions``.
``radfl simulate`` then sets ``RADFL_SIMULATION_DATA`` to a folder of synthetic site folders
(``site-0``, ``site-1``, ...), and virtual node ``k`` reads ``site-k`` through the same loader
as a real site. Without it (a bare ``flwr run .``), node ``k`` generates synthetic hospital
``k`` in memory from the run's seed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from client.datasets import LabelledDataset, SampleDataset
from common import manifest as mf
from common.config import SIMULATION_DATA_ENV, ClientConfig
from common.errors import ConfigError
from common.splits import TEST, TRAIN, VALIDATION, SplitFractions, assign_splits
from common.synthetic import SiteData, make_site, plant_shortcut, site_profiles
from common.tasks import Task, get_task, task_class

log = logging.getLogger(__name__)

#: The site's log folder inside its data folder: the ClientApp's log, the daemon's
#: (``client.daemon``) and the audit log (``client.audit``).
LOG_FOLDER = ".radfl-logs"
CLIENTAPP_LOG = "clientapp.log"


@dataclass(frozen=True)
class SiteSplits:
    """A site's data divided by patient into training, validation and (optionally) test parts."""

    name: str
    train: LabelledDataset
    validation: LabelledDataset
    test: LabelledDataset | None = None
    skipped_rows: int = 0
    #: Unlabelled studies of the training split (pseudo-labelling; ``client.pseudo_labels``).
    unlabelled: LabelledDataset | None = None


def site_name(node_config: Mapping[str, Any]) -> str:
    """The site's name: ``site-name``, else the data folder's name, else ``site-<partition-id>``."""
    if "site-name" in node_config:
        return str(node_config["site-name"])
    if "data-path" in node_config:
        return Path(str(node_config["data-path"])).name
    if "partition-id" in node_config:
        return f"site-{int(node_config['partition-id'])}"
    raise ConfigError("node_config has neither 'site-name', 'data-path' nor 'partition-id'")


# ClientApp processes (Ray actors in simulation) live across rounds: load each site once.
_CACHE: dict[tuple[Any, ...], SiteSplits] = {}


def clear_cache() -> None:
    """Forget every loaded site, as a ClientApp process that ends does (``radfl simulate``'s
    in-process sites call it when the run ends, so a later run reads its data afresh)."""
    _CACHE.clear()


def data_folder(node_config: Mapping[str, Any]) -> Path | None:
    """The site folder: ``data-path``, or in a simulation on disk ``site-<partition-id>`` of
    ``RADFL_SIMULATION_DATA``; ``None`` for a synthetic hospital generated in memory."""
    if "data-path" in node_config:
        return Path(str(node_config["data-path"])).expanduser()
    simulation_root = os.environ.get(SIMULATION_DATA_ENV)
    if simulation_root and "partition-id" in node_config:
        return Path(simulation_root) / f"site-{int(node_config['partition-id'])}"
    return None


def log_path(node_config: Mapping[str, Any]) -> Path | None:
    """The site's own log file (``log-path``, default ``DATA-PATH/.radfl-logs/clientapp.log``);
    ``None`` for a synthetic hospital in memory without ``log-path``."""
    if "log-path" in node_config:
        return Path(str(node_config["log-path"])).expanduser()
    folder = data_folder(node_config)
    return folder / LOG_FOLDER / CLIENTAPP_LOG if folder is not None else None


def load_site(node_config: Mapping[str, Any], config: ClientConfig) -> SiteSplits:
    """The site's data, split by patient: a site folder, or a synthetic hospital in memory."""
    node_config = dict(node_config)
    folder = data_folder(node_config)
    if folder is not None:
        node_config["data-path"] = str(folder)
    if "data-path" in node_config:
        key: tuple[Any, ...] = (
            tuple(sorted(node_config.items())),
            config.model_config,
            config.validation_fraction,
            config.test_fraction,
            config.pseudo_labelling,
        )
        if key not in _CACHE:
            _CACHE[key] = site_folder(node_config, config)
        return _CACHE[key]
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


def site_folder(node_config: Mapping[str, Any], config: ClientConfig) -> SiteSplits:
    """A site folder checked (``radfl site check``), cached, and split by patient."""
    # Imported here: MONAI's readers are only needed by sites that read folders.
    from client.check import load_checked_site
    from client.data import SiteDataError, SiteDataset

    root = Path(str(node_config["data-path"])).expanduser()
    cache_dir = Path(str(node_config["cache-path"])) if "cache-path" in node_config else None
    skip_bad_rows = _flag(node_config.get("skip-bad-rows", False), "skip-bad-rows")
    name = site_name(node_config)
    rows, report = load_checked_site(
        root,
        task=config.task,
        spatial_dims=config.spatial_dims,
        num_classes=config.num_classes,
        image_size=config.image_size,
        skip_bad_rows=skip_bad_rows,
        cache_dir=cache_dir,
        unlabelled_ok=config.pseudo_labelling,
    )
    for line in report.problem_lines():
        log.warning("site %s skips %s", name, line)
    splits = assign_splits(
        rows[mf.PATIENT_ID],
        seed=int(node_config.get("split-seed", 0)),
        fractions=split_fractions(config),
    ).to_numpy()
    kind = task_class(config.task)
    target = kind.label_column
    # Rows with a blank target are left only with pseudo-labelling on (the check refused them).
    blank = (
        (rows[target] == "").to_numpy()
        if kind.label_is_target and target in rows.columns
        else np.zeros(len(rows), dtype=bool)
    )
    if (blank & (splits != TRAIN)).any():
        log.info(
            "site %s: %d unlabelled studies fall into the validation or test split and are left "
            "out of them",
            name,
            int((blank & (splits != TRAIN)).sum()),
        )

    def part(split: str, unlabelled: bool = False) -> SiteDataset:
        return SiteDataset(
            rows[(splits == split) & (blank == unlabelled)],
            root,
            task=config.task,
            spatial_dims=config.spatial_dims,
            image_size=config.image_size,
            cache_dir=cache_dir,
            num_classes=config.num_classes,
            unlabelled=unlabelled,
        )

    train, validation = part(TRAIN), part(VALIDATION)
    for split, dataset in ((TRAIN, train), (VALIDATION, validation)):
        if len(dataset) == 0:
            raise SiteDataError(
                f"site {name} ({root}): no patient falls into the {split} split "
                f"({len(rows)} usable rows); the site needs more patients"
            )
    test = part(TEST) if ((splits == TEST) & ~blank).any() else None
    unlabelled = part(TRAIN, unlabelled=True) if (blank & (splits == TRAIN)).any() else None
    return SiteSplits(
        name, train, validation, test, skipped_rows=len(report.bad_lines), unlabelled=unlabelled
    )


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ConfigError(f"node_config {key} must be true or false, got {value!r}")


def synthetic_site(index: int, count: int, config: ClientConfig) -> SiteSplits:
    """Synthetic hospital ``index`` of ``count``, split by patient into train and validation."""
    if not 0 <= index < count:
        raise ConfigError(f"partition-id {index} is outside 0..{count - 1}")
    profile = site_profiles(count, config.synthetic_samples_per_site, config.seed)[index]
    task = get_task(config.model_config)
    data = make_site(
        profile,
        index=index,
        image_size=config.image_size,
        spatial_dims=config.spatial_dims,
        num_classes=config.num_classes,
        seed=config.seed,
        **task.synthetic_options(),
    )
    if index == config.synthetic_shortcut_site:
        data = plant_shortcut(data, config.seed)
    return split_site(data, split_fractions(config), config.seed, task)


def split_site(
    data: SiteData, fractions: SplitFractions, seed: int, task: Task | None = None
) -> SiteSplits:
    """Normalise each image (z-score) and split the site by patient (``common.splits``).

    Samples are labelled for ``task`` (``Task.synthetic_targets``); by default with the
    image's class.
    """
    images = normalize_intensity(data.images)
    targets = None if task is None else task.synthetic_targets(data)
    with_lesions = task is not None and task.lesion_masks
    splits = assign_splits(data.patient_ids, seed=seed, fractions=fractions).to_numpy()

    attributes = pd.DataFrame(
        {
            mf.PATIENT_ID: data.patient_ids,
            mf.SEX: data.sex or None,
            mf.AGE: data.age or None,
            mf.MANUFACTURER: data.profile.manufacturer,
        }
    )

    def part(name: str) -> SampleDataset:
        selected = splits == name
        index = torch.from_numpy(selected)
        chosen: torch.Tensor | list[Any] | None
        if targets is None or isinstance(targets, torch.Tensor):
            chosen = None if targets is None else targets[index]
        else:
            chosen = [t for t, keep in zip(targets, selected, strict=True) if keep]
        lesions = data.masks[index] if with_lesions and data.masks is not None else None
        return SampleDataset(
            images[index], data.labels[index], attributes[selected], chosen, lesions
        )

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
