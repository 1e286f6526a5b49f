"""A site folder read through node_config, as a real site's ClientApp reads it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from client import site as site_module
from client.data import SiteDataError
from client.site import load_site, site_name
from common import manifest as mf
from common.config import SIMULATION_DATA_ENV, ClientConfig, default_run_config, from_run_config
from simulations.synth import FederationSpec, write_federation


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> list[Path]:
    return write_federation(
        tmp_path_factory.mktemp("fed"),
        FederationSpec(
            sites=3,
            task="classification",
            dims=2,
            seed=3,
            samples_per_site=60,
            image_size=32,
            num_classes=2,
        ),
    )


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(site_module, "_CACHE", {})


def _config() -> ClientConfig:
    return from_run_config(
        ClientConfig, {**default_run_config(), "image-size": 32, "model": "small-cnn"}
    )


@pytest.mark.parametrize("index", [0, 1, 2])  # DICOM, NIfTI, PNG sites
def test_site_folder_loads_patient_disjoint_splits(federation, index, tmp_path):
    root = federation[index]
    node_config = {"data-path": str(root), "cache-path": str(tmp_path / "cache")}
    splits = load_site(node_config, _config())
    assert splits.name == root.name == site_name(node_config)
    sample = splits.train[0]
    assert sample["image"].shape == (1, 32, 32) and torch.isfinite(sample["image"]).all()
    manifest = pd.read_csv(root / mf.MANIFEST_NAME)
    patients = {}
    for part in ("train", "validation", "test"):
        dataset = getattr(splits, part)
        assert dataset is not None and len(dataset) > 0
        lines = [line - 2 for line in dataset.lines]  # CSV line -> DataFrame row
        patients[part] = set(manifest.iloc[lines][mf.PATIENT_ID])
    assert not patients["train"] & patients["validation"]
    assert not patients["train"] & patients["test"]
    assert not patients["validation"] & patients["test"]
    assert sum(len(getattr(splits, p)) for p in ("train", "validation", "test")) == len(manifest)


def test_simulated_node_reads_its_site_folder(federation, monkeypatch):
    monkeypatch.setenv(SIMULATION_DATA_ENV, str(federation[0].parent))
    splits = load_site({"partition-id": 1, "num-partitions": 3}, _config())
    assert splits.name == "site-1"
    assert len(splits.train) + len(splits.validation) + len(splits.test) == len(
        pd.read_csv(federation[1] / mf.MANIFEST_NAME)
    )


def _broken_copy(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    table = pd.read_csv(target / mf.MANIFEST_NAME)
    (target / table.loc[0, mf.IMAGE]).unlink()  # line 2: a missing file
    return target


def test_failing_site_refuses_to_train_naming_row_and_file(federation, tmp_path):
    root = _broken_copy(federation[2], tmp_path / "broken")
    missing = pd.read_csv(root / mf.MANIFEST_NAME).loc[0, mf.IMAGE]
    with pytest.raises(SiteDataError, match=rf"line 2: {missing}"):
        load_site({"data-path": str(root)}, _config())


def test_site_may_skip_bad_rows_and_reports_them(federation, tmp_path):
    root = _broken_copy(federation[2], tmp_path / "broken")
    splits = load_site({"data-path": str(root), "skip-bad-rows": True}, _config())
    assert splits.skipped_rows == 1
    total = len(splits.train) + len(splits.validation) + (len(splits.test) if splits.test else 0)
    assert total == len(pd.read_csv(root / mf.MANIFEST_NAME)) - 1
