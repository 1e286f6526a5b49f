"""``radfl predict`` for detection and instance segmentation: boxes as JSON in the input's
voxels and world millimetres, instance maps as NIfTI, the pyfunc's boxes, and the same boxes
and scores as the final evaluation's path on a synthetic site.

The models are logged here through the coordinator's own ``server.tracking.log_models`` (no
federation: an untrained detector finds no box above its score threshold, so its
classification bias is raised until every anchor scores about 0.88 and the detector's
selection, NMS and masks have boxes to work on)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from torch.utils.data import DataLoader

from client import data, predict, predict_boxes

IMAGE_SIZE = 32
TASKS = {"detection": "retinanet", "instance": "retina-unet"}


def _confident(network: torch.nn.Module) -> None:
    """Raise every anchor's class logit to about 2 (score 0.88)."""
    with torch.no_grad():
        network.classification_head.cls_logits.bias.fill_(2.0)  # type: ignore[union-attr,operator]


@pytest.fixture(scope="module")
def box_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import mlflow

    from common.config import ServerConfig, default_run_config, from_run_config
    from common.tasks.base import ModelConfig, get_task
    from server import tracking
    from simulations.synth import FederationSpec, write_federation
    from tests.simulations.conftest import tracking_uri

    folder = tmp_path_factory.mktemp("predict-boxes")
    uri = tracking_uri(folder)
    runs: dict[str, str] = {}
    sites: dict[str, list[Path]] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        experiment = tracking.ensure_experiment("predict-boxes")
        for task, model in TASKS.items():
            settings = {"task": task, "model": model, "image-size": IMAGE_SIZE}
            config = from_run_config(ServerConfig, {**default_run_config(), **settings})
            network = get_task(
                ModelConfig(task, model, 2, IMAGE_SIZE, config.num_classes, seed=0)
            ).build_model()
            _confident(network)
            with mlflow.start_run(experiment_id=experiment) as run:
                tracking.log_models(
                    network,
                    final_state=network.state_dict(),
                    best_state=None,
                    best_round=None,
                    config=config,
                    register_as=None,
                )
            runs[task] = run.info.run_id
            sites[task] = write_federation(
                folder / task,
                FederationSpec(
                    sites=3,
                    task=task,
                    dims=2,
                    seed=5,
                    samples_per_site=8,
                    image_size=IMAGE_SIZE,
                    num_classes=2,
                ),
            )
    return {"folder": folder, "uri": uri, "runs": runs, "sites": sites}


def _predict(box_models: dict[str, Any], task: str, inputs: list[str], out: Path) -> int:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", box_models["uri"])
        argv = [box_models["runs"][task], *inputs, "--out", str(out), "--quiet", "--overlays"]
        return predict.main(argv)


def _evaluation_boxes(box_models: dict[str, Any], task: str, site: Path) -> dict[str, Any]:
    """The final evaluation's path on a site's first row (the network's forward is the
    test's cost): ``SiteDataset`` (cached preprocessing) and ``task.predict``, with the logged
    network; by the image's path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", box_models["uri"])
        model = predict.load_model(box_models["runs"][task])
    definition = predict_boxes.task_of(model.metadata)
    rows = data.read_manifest(site, task).head(1)
    dataset = data.SiteDataset(
        rows,
        site,
        task=task,
        spatial_dims=2,
        image_size=IMAGE_SIZE,
        cache_dir=box_models["folder"] / "cache",
    )
    found: list[Any] = []
    for batch in DataLoader(dataset, batch_size=4, collate_fn=definition.collate):
        found += definition.predict(model.network, batch)[0]
    paths = [str(data.resolve_path(site, name)) for name in dataset.files]
    return dict(zip(paths, found, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_boxes_and_scores_equal_the_final_evaluations_on_dicom_nifti_and_png_sites(
    box_models: dict[str, Any], task: str, tmp_path: Path
) -> None:
    expected_by_site = [_evaluation_boxes(box_models, task, s) for s in box_models["sites"][task]]
    out = tmp_path / "out"
    inputs = [name for expected in expected_by_site for name in expected]
    assert _predict(box_models, task, inputs, out) == 0
    table = pd.read_csv(out / "predictions.csv").set_index("input")
    compared = 0
    for site_boxes in expected_by_site:  # DICOM CT, NIfTI MR, PNG DX
        for name, expected in site_boxes.items():
            document = json.loads(Path(table.loc[name, "boxes"]).read_text())
            scores = sorted(expected["scores"].tolist(), reverse=True)
            assert len(scores) > 0
            assert table.loc[name, "num_boxes"] == len(document["boxes"]) == len(scores)
            got = [box["score"] for box in document["boxes"]]
            assert np.allclose(got, scores, atol=1e-4), name
            assert document["score_threshold"] == pytest.approx(0.02)
            assert min(got) >= document["score_threshold"]
            # Each box lies on the input's own grid.
            shape = np.asarray(document["shape"] * 2, dtype=float)
            corners = np.asarray([box["box_voxel"] for box in document["boxes"]])
            assert (corners >= -1e-6).all() and (corners <= shape + 1e-6).all(), name
            assert (corners[:, 2:] > corners[:, :2]).all(), name
            has_world = not name.endswith(".png")
            assert (document["world_frame"] == "RAS") is has_world, name
            assert (document["boxes"][0]["box_world_mm"] is not None) is has_world, name
            if task == "instance":
                mask = np.asarray(nib.load(table.loc[name, "mask"]).dataobj)
                assert mask.shape == tuple(document["shape"]), name
                counts = np.bincount(mask.ravel(), minlength=len(got) + 1)
                assert [box["voxels"] for box in document["boxes"]] == list(counts[1:]), name
            # The overlay draws the boxes scoring >= 0.3 in colour on the grey image.
            picture = np.asarray(Image.open(table.loc[name, "overlay"]))
            assert (picture[15:, :, 0] != picture[15:, :, 1]).any(), name
            compared += 1
    assert compared == len(table) == 3


def test_a_box_on_the_training_grid_lands_on_the_inputs_voxels_and_patient_millimetres() -> None:
    # CT_small: 128 x 128 pixels of 0.661468 mm, the first at LPS (-158.135803, -179.035797).
    grid = predict_boxes.input_grid(Path(get_testdata_file("CT_small.dcm")), 2)
    assert grid.shape == (128, 128) and grid.has_world
    box = predict_boxes.native_boxes(np.array([[0.0, 8.0, 16.0, 32.0]]), grid, 32)
    assert np.allclose(box, [[0.0, 32.0, 64.0, 128.0]])  # x4 per axis
    world = predict_boxes.world_corners(box, grid.affine)[0]
    # The box's first corner is the first pixel's outer edge: half a pixel before its centre
    # (RAS: x and y are LPS negated).
    spacing = 0.661468
    assert np.allclose(world[0], [158.135803 + spacing / 2, 179.035797 - 31.5 * spacing, -75.7])
    assert np.allclose(world[1][0], 158.135803 - 63.5 * spacing)


def test_a_volumes_box_returns_from_ras_to_its_own_axes(tmp_path: Path) -> None:
    import nibabel as nib

    volume = tmp_path / "lps.nii.gz"
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])  # the first two axes run toward left, posterior
    nib.save(nib.Nifti1Image(np.zeros((20, 24, 12), dtype=np.float32), affine), str(volume))
    grid = predict_boxes.input_grid(volume, 3)
    # On the RAS grid (32 per axis) the box covers the first quarter of every axis...
    box = predict_boxes.native_boxes(np.array([[0.0, 0.0, 0.0, 8.0, 8.0, 8.0]]), grid, 32)
    # ...which on the input's own axes is the far end of the first two and the start of z.
    assert np.allclose(box, [[15.0, 18.0, 0.0, 20.0, 24.0, 3.0]])
    world = predict_boxes.world_corners(box, affine)[0]
    assert np.allclose(world[0], [-0.8 * 14.5, -0.8 * 17.5, -1.25])


@pytest.mark.slow
def test_the_pyfunc_answers_boxes_and_instance_masks(box_models: dict[str, Any]) -> None:
    import io

    import mlflow
    from mlflow.pyfunc.scoring_server import predictions_to_json

    ct = get_testdata_file("CT_small.dcm")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", box_models["uri"])
        served = mlflow.pyfunc.load_model(f"runs:/{box_models['runs']['instance']}/final-model")
    answer = served.predict(pd.DataFrame({"path": [ct]}))
    assert answer.loc[0, "error"] == ""
    boxes = answer.loc[0, "boxes"]
    assert len(boxes) == answer.loc[0, "num_boxes"] > 0
    assert {"instance", "class", "score", "box_voxel", "box_world_mm", "voxels"} <= set(boxes[0])
    mask = np.asarray(answer.loc[0, "mask"])
    assert mask.shape == (128, 128)
    assert int((mask == 1).sum()) == boxes[0]["voxels"]
    # What `mlflow models serve` sends back over HTTP: the same boxes, as JSON.
    sent = io.StringIO()
    predictions_to_json(answer, sent)
    assert json.loads(sent.getvalue())["predictions"][0]["boxes"] == boxes


def test_a_model_that_finds_no_box_writes_an_empty_list_and_a_plain_overlay(
    tmp_path: Path,
) -> None:
    from mlflow.models import Model

    from common.tasks.base import ModelConfig, get_task
    from server.tracking import ServedPyTorch
    from tests.client.test_predict import METADATA

    # Untrained, every anchor scores about 0.01: below the detector's 0.02.
    network = get_task(ModelConfig("detection", "retinanet", 2, IMAGE_SIZE, 2, 0)).build_model()
    model = tmp_path / "model"
    ServedPyTorch.save_model(
        path=str(model),
        mlflow_model=Model(),
        pytorch_model=network.eval(),
        serialization_format="pickle",
        metadata={"radfl": {**METADATA, "task": "detection", "model": "retinanet"}},
        pip_requirements=["torch"],
    )
    ct = str(get_testdata_file("CT_small.dcm"))
    out = tmp_path / "out"
    assert predict.main([str(model), ct, "--out", str(out), "--quiet", "--overlays"]) == 0
    row = pd.read_csv(out / "predictions.csv").iloc[0]
    assert row["num_boxes"] == 0 and row["max_score"] == 0.0
    assert json.loads(Path(row["boxes"]).read_text())["boxes"] == []
    picture = np.asarray(Image.open(row["overlay"]).convert("RGB")).astype(int)
    assert (picture[15:, :, 0] == picture[15:, :, 1]).all()  # nothing drawn on the image
