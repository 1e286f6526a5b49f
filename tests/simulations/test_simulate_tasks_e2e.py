"""End to end: `radfl simulate` of each non-classification task on synthetic site folders,
2D here (test_simulate_tasks_3d_e2e.py: 3D), read back from the MLflow store they wrote. Out of
test_simulate_e2e.py so that a parallel test run (pytest-xdist, a module per worker) spreads
these nine-odd minutes of simulations over its workers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.simulations.test_simulate_e2e import RADFL, _client, _env, _only_run

pytestmark = pytest.mark.slow


def _simulate_task(
    tmp_path: Path, task: str, dims: int, *, samples: int, in_memory: bool = False
) -> None:
    """A tiny `radfl simulate --task TASK --dims DIMS` run: 2 sites, 1 round, 32 px. One round
    logs the untrained model (step 0) and the first aggregate (step 1) and runs the final test
    evaluation and report; sending an aggregate back out for more training is the same code for
    every task and is covered by the two-round classification run of test_simulate_e2e.py."""
    settings = {
        "image-size": 32,
        "synthetic-samples-per-site": samples,
        "batch-size": 4,
        "local-epochs": 1,
        "min-cell-size": 2,
    }
    overrides = [part for k, v in settings.items() for part in ("--set", f"{k}={v}")]
    options = ["--task", task, "--dims", str(dims), "--sites", "2", "--rounds", "1"]
    done = subprocess.run(
        [RADFL, "simulate", *(["--in-memory"] if in_memory else []), *options, *overrides],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def check_segmentation(tmp_path: Path, dims: int) -> None:
    """`radfl simulate --task segmentation` on synthetic DICOM/NIfTI/PNG-or-NPY sites with masks."""
    _simulate_task(tmp_path, "segmentation", dims, samples=40)
    client = _client(tmp_path)
    run = _only_run(client, "federated")
    assert run.data.params["model"] == "unet" and run.data.params["spatial_dims"] == str(dims)
    history = client.get_metric_history(run.info.run_id, "pooled/dice")
    assert sorted(m.step for m in history) == [0, 1]
    assert all(0.0 <= m.value <= 1.0 for m in history)
    report = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/metrics.csv", "report/subgroups.csv", "report/model_card.md"} <= report
    assert "report/roc.png" not in report  # classification only
    assert "report/overlays.png" in report  # simulation only: synthetic images on this machine
    assert "test/dice_case_mean" in run.data.metrics


def check_detection(tmp_path: Path, dims: int) -> None:
    """`radfl simulate --task detection`: boxes read from the manifests of synthetic sites,
    RetinaNet without torchvision; boxes never leave a site."""
    _simulate_task(tmp_path, "detection", dims, samples=32 if dims == 3 else 40)
    client = _client(tmp_path)
    run = _only_run(client, "federated")
    assert run.data.params["model"] == "retinanet"
    history = client.get_metric_history(run.info.run_id, "pooled/ap50")
    assert sorted(m.step for m in history) == [0, 1]
    assert "test/ap50" in run.data.metrics and "test/sensitivity_at_1_fp" in run.data.metrics


def check_instance_segmentation(tmp_path: Path, dims: int) -> None:
    """`radfl simulate --task instance`: Retina U-Net on instance masks read from site folders;
    the report has mask AP, box AP and per-instance Dice."""
    _simulate_task(tmp_path, "instance", dims, samples=32 if dims == 3 else 40)
    client = _client(tmp_path)
    run = _only_run(client, "federated")
    assert run.data.params["model"] == "retina-unet"
    history = client.get_metric_history(run.info.run_id, "pooled/ap50")
    assert sorted(m.step for m in history) == [0, 1]
    for name in ("ap50", "map", "box_ap50", "instance_dice"):
        assert f"test/{name}" in run.data.metrics
    assert 0.0 <= run.data.metrics["test/instance_dice"] <= 1.0
    report = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/metrics.csv", "report/subgroups.md", "report/overlays.png"} <= report


def test_segmentation_trains_federated_from_site_folders(tmp_path: Path):
    check_segmentation(tmp_path, 2)


def test_detection_trains_federated_from_site_folders(tmp_path: Path):
    check_detection(tmp_path, 2)


def test_instance_segmentation_trains_federated_from_site_folders(tmp_path: Path):
    check_instance_segmentation(tmp_path, 2)
