"""End to end: `radfl simulate` of each non-classification task on synthetic 3D site folders
(the checks are test_simulate_tasks_e2e.py's, run there in 2D)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.simulations.test_simulate_tasks_e2e import (
    check_detection,
    check_instance_segmentation,
    check_segmentation,
)

pytestmark = pytest.mark.slow


def test_segmentation_trains_federated_from_site_folders(tmp_path: Path):
    check_segmentation(tmp_path, 3)


def test_detection_trains_federated_from_site_folders(tmp_path: Path):
    check_detection(tmp_path, 3)


def test_instance_segmentation_trains_federated_from_site_folders(tmp_path: Path):
    check_instance_segmentation(tmp_path, 3)
