"""``radfl predict``: the logged model's metadata, its refusals, and (slow) predictions of a
tiny federation's registered model on synthetic DICOM, NIfTI and PNG sites and on pydicom's
own test files, equal to the final evaluation's probabilities on the same images."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from pydicom.data import get_testdata_file
from torch.utils.data import DataLoader

from client import data, predict
from common.calibration import calibrated_threshold
from common.errors import ConfigError
from common.tasks.base import ModelConfig, get_task

METADATA: dict[str, Any] = {
    "version": 2,
    "task": "classification",
    "model": "small-cnn",
    "spatial_dims": 2,
    "image_size": 32,
    "num_classes": 2,
    "class_names": ["0", "1"],
    "ct_window_hu": [40.0, 400.0],
    "spacing_mm": None,
    "threshold": 0.3,
    "temperature": 1.0,
}


def test_model_uri_takes_run_ids_registry_uris_and_folders(tmp_path: Path) -> None:
    run_id = "342d8bfbe30848b0936b80b76b7a9c37"
    assert predict.model_uri(run_id) == f"runs:/{run_id}/final-model"
    assert predict.model_uri("models:/radfl-x/3") == "models:/radfl-x/3"
    assert predict.model_uri(str(tmp_path)) == str(tmp_path.resolve())
    with pytest.raises(ConfigError, match="'no-such-thing' is neither a folder, a run id"):
        predict.model_uri("no-such-thing")


def test_a_model_logged_without_radfl_metadata_is_refused_by_name() -> None:
    from server.tracking import MODEL_METADATA_VERSION

    assert predict.METADATA_VERSION == MODEL_METADATA_VERSION  # predict reads what runs log
    with pytest.raises(ConfigError, match="model old carries no 'radfl' metadata"):
        predict.read_metadata("old", {"other": 1})
    with pytest.raises(ConfigError, match="metadata version 7 is not the 2 this RadFL reads$"):
        predict.read_metadata("new", {"radfl": {**METADATA, "version": 7}})
    # A model from before the per-image z-score would be fed other inputs than it learnt from.
    with pytest.raises(ConfigError, match="version 1 is not the 2 .*trained before images were z-"):
        predict.read_metadata("old", {"radfl": {**METADATA, "version": 1}})
    with pytest.raises(ConfigError, match="metadata lacks image_size"):
        predict.read_metadata(
            "cut", {"radfl": {k: v for k, v in METADATA.items() if k != "image_size"}}
        )
    with pytest.raises(ConfigError, match="task 'regression'; radfl predict writes outputs for"):
        predict.read_metadata("reg", {"radfl": {**METADATA, "task": "regression"}})


def test_classification_row_applies_the_models_threshold_and_temperature() -> None:
    model = predict.LoadedModel(None, METADATA, "m")
    row = predict.classification_row(model, np.array([0.65, 0.35]))
    assert row["label"] == "1"  # 0.35 >= the threshold 0.3, although class 0 is likelier
    assert row["uncertainty"] == pytest.approx(-(0.65 * np.log(0.65) + 0.35 * np.log(0.35)))
    logits = torch.tensor([[2.0, 0.0]])
    hot = predict.calibrated_probabilities(logits, 2.0)
    assert hot[0, 0].item() == pytest.approx(torch.softmax(logits / 2, dim=1)[0, 0].item())
    assert hot[0, 0] < predict.calibrated_probabilities(logits, 1.0)[0, 0]


# ---------------------------------------------------------------------------------------------
# A tiny federation's registered model on synthetic sites (slow: one run for the module)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from simulations.synth import FederationSpec, write_federation
    from tests.simulations.conftest import (
        run_radfl,
        the_run,
        tiny_simulate_command,
        tracking_env,
    )

    folder = tmp_path_factory.mktemp("predict-run")
    env = tracking_env(folder)
    run_radfl(tiny_simulate_command(sites=2, rounds=1), folder, env)
    client, run = the_run(folder)
    sites = write_federation(
        folder / "synth",
        FederationSpec(
            sites=3,
            task="classification",
            dims=2,
            seed=3,
            samples_per_site=8,
            image_size=32,
            num_classes=2,
        ),
    )
    return {"folder": folder, "client": client, "run": run, "env": env, "sites": sites}


def _evaluation_probabilities(
    run: dict[str, Any], metadata: Mapping[str, Any], site: Path
) -> dict[str, np.ndarray]:
    """The final evaluation's path on a site's rows: ``SiteDataset`` (cached preprocessing),
    batches, the network's logits, with the run's logged final weights in a fresh network
    (fp32), scaled by the calibration temperature the model carries (the evaluation's
    ``task.predict`` is its softmax at T = 1)."""
    task = get_task(
        ModelConfig(
            task=metadata["task"],
            model=metadata["model"],
            spatial_dims=metadata["spatial_dims"],
            image_size=metadata["image_size"],
            num_classes=metadata["num_classes"],
            seed=0,
        )
    )
    network = task.build_model()
    weights = run["client"].download_artifacts(
        run["run"].info.run_id, "weights/final.pt", str(run["folder"])
    )
    network.load_state_dict(torch.load(weights))
    network.eval()
    rows = data.fill_subgroups_from_dicom(data.read_manifest(site, "classification"), site)
    dataset = data.SiteDataset(
        rows,
        site,
        task="classification",
        spatial_dims=2,
        image_size=metadata["image_size"],
        cache_dir=run["folder"] / "cache",
    )
    found: list[np.ndarray] = []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=16, collate_fn=task.collate):
            logits = network(batch["image"])
            found += list(predict.calibrated_probabilities(logits, metadata["temperature"]).numpy())
    return dict(zip(dataset.files, found, strict=True))


@pytest.mark.slow
def test_predict_matches_the_final_evaluation_and_skips_a_corrupt_file_by_name(
    tiny_run: dict[str, Any], tmp_path: Path
) -> None:
    run_id = tiny_run["run"].info.run_id
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    array = tmp_path / "study.npy"
    np.save(array, np.random.default_rng(0).random((40, 40), dtype=np.float32))
    ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
    sites = tiny_run["sites"]
    out = tmp_path / "out"
    inputs = [str(sites[0]), str(sites[1] / "manifest.csv"), str(sites[2]), str(corrupt)]
    argv = [run_id, *inputs, str(array), str(ct), str(mr), "--out", str(out), "--quiet"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tiny_run["env"]["MLFLOW_TRACKING_URI"])
        model = predict.load_model(run_id)
        code = predict.main(argv)
    assert code == 1  # one input failed
    failed = pd.read_csv(out / "failed.csv")
    assert list(failed["input"]) == [str(corrupt)]
    table = pd.read_csv(out / "predictions.csv", dtype={"label": str})
    assert {str(array), str(ct), str(mr)} <= set(table["input"])
    assert table.set_index("input").loc[str(ct), "modality"] == "CT"
    assert table.set_index("input").loc[str(mr), "modality"] == "MR"
    assert set(table["label"]) <= {"0", "1"}
    assert np.allclose(table[["p_0", "p_1"]].sum(axis=1), 1.0, atol=1e-5)
    # The threshold the model carries is the one the report chose on pooled validation,
    # moved onto the calibrated scale (the same decisions), with the fitted temperature.
    metrics = tiny_run["run"].data.metrics
    assert model.metadata["temperature"] == pytest.approx(metrics["test/temperature"])
    assert model.metadata["threshold"] == pytest.approx(
        calibrated_threshold(metrics["test/threshold"], metrics["test/temperature"])
    )
    expected_label = (table["p_1"] >= model.metadata["threshold"]).astype(int).astype(str)
    assert list(table["label"]) == list(expected_label)
    by_name = table.set_index("input")
    compared = 0
    for site in sites:  # DICOM CT, NIfTI MR, PNG DX
        for name, probabilities in _evaluation_probabilities(
            tiny_run, model.metadata, site
        ).items():
            got = by_name.loc[name, ["p_0", "p_1"]].to_numpy(dtype=np.float64)
            assert np.abs(got - probabilities).max() <= 1e-4, (site, name, got, probabilities)
            compared += 1
    assert compared == len(table) - 3


# ---------------------------------------------------------------------------------------------
# Segmentation: a model folder saved here (no federation needed), masks as NIfTI and DICOM SEG
# ---------------------------------------------------------------------------------------------


def _segmentation_model(folder: Path, spatial_dims: int, image_size: int) -> Path:
    from mlflow.models import Model

    from server.tracking import ServedPyTorch

    config = ModelConfig(
        task="segmentation",
        model="unet",
        spatial_dims=spatial_dims,
        image_size=image_size,
        num_classes=2,
        seed=0,
    )
    network = get_task(config).build_model().eval()
    path = folder / f"seg-{spatial_dims}d"
    metadata = {
        **METADATA,
        "task": "segmentation",
        "model": "unet",
        "spatial_dims": spatial_dims,
        "image_size": image_size,
        "threshold": None,
    }
    # As the coordinator logs it: the pyfunc loader is client/serving.py.
    ServedPyTorch.save_model(
        path=str(path),
        mlflow_model=Model(),
        pytorch_model=network,
        serialization_format="pickle",
        metadata={"radfl": metadata},
        pip_requirements=["torch"],
    )
    return path


def _rectangular_dicom(path: Path) -> Path:
    """pydicom's CT_small.dcm cut to 128 rows x 90 columns (a SEG frame must not transpose)."""
    import pydicom

    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    pixels = dataset.pixel_array[:, :90].copy()
    dataset.PixelData = pixels.tobytes()
    dataset.Columns = 90
    dataset.save_as(path)
    return path


def test_segmentation_masks_follow_each_input_and_dicom_seg_frames_match_them(
    tmp_path: Path,
) -> None:
    import highdicom as hd
    import nibabel as nib
    import pydicom

    model = _segmentation_model(tmp_path, spatial_dims=2, image_size=32)
    rect = _rectangular_dicom(tmp_path / "rect.dcm")
    png = tmp_path / "xray.png"
    from PIL import Image

    Image.fromarray((np.random.default_rng(1).random((50, 70)) * 255).astype(np.uint8)).save(png)
    ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
    out = tmp_path / "out"
    assert predict.main([str(model), str(rect), ct, mr, str(png), "--out", str(out)]) == 0
    table = pd.read_csv(out / "predictions.csv").set_index("input")
    shapes = {str(png): (70, 50)}  # PIL reads (width, height) into MONAI's first two axes
    for source in (rect, Path(ct), Path(mr)):
        dataset = pydicom.dcmread(source)
        shapes[str(source)] = (dataset.Columns, dataset.Rows)
    for name, shape in shapes.items():
        mask = np.asarray(nib.load(table.loc[name, "mask"]).dataobj)
        assert mask.shape == shape, name
        assert table.loc[name, "foreground_voxels"] == int((mask > 0).sum())
        if name == str(png):
            assert pd.isna(table.loc[name, "dicom_seg"])
            continue
        seg = hd.seg.segread(table.loc[name, "dicom_seg"])
        source = pydicom.dcmread(name)
        assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
        frame = np.asarray(seg.pixel_array)  # one frame, one segment: (rows, columns)
        assert frame.shape == (source.Rows, source.Columns), name
        assert np.array_equal(frame > 0, mask.T > 0), name
    assert 0 < int(table["foreground_voxels"].sum()) < sum(a * b for a, b in shapes.values())


def test_a_3d_mask_returns_to_the_volumes_own_axes_and_affine(tmp_path: Path) -> None:
    import nibabel as nib

    model = _segmentation_model(tmp_path, spatial_dims=3, image_size=32)
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])  # LPS-like axes, anisotropic voxels
    volume = tmp_path / "ct.nii.gz"
    nib.save(
        nib.Nifti1Image(np.random.default_rng(2).random((20, 24, 12)).astype(np.float32), affine),
        str(volume),
    )
    out = tmp_path / "out"
    assert predict.main([str(model), str(volume), "--out", str(out), "--quiet"]) == 0
    table = pd.read_csv(out / "predictions.csv")
    written = nib.load(table.loc[0, "mask"])
    assert written.shape == (20, 24, 12)
    assert np.allclose(written.affine, affine)
    assert "dicom_seg" not in table.columns


def test_a_mask_corner_on_the_ras_grid_lands_in_the_matching_native_corner(tmp_path: Path) -> None:
    import nibabel as nib

    from client.predict_outputs import native_mask

    volume = tmp_path / "lps.nii.gz"
    image = np.zeros((20, 24, 12), dtype=np.float32)
    nib.save(nib.Nifti1Image(image, np.diag([-0.8, -0.8, 2.5, 1.0])), str(volume))
    mask = np.zeros((32, 32, 32), dtype=np.uint8)
    mask[:8, :8, :8] = 1  # RAS grid: index 0 is the left, posterior, inferior corner
    native, _ = native_mask(mask, volume)
    # LPS axes: the first two run toward left and posterior, so that corner is at their ends.
    assert native[-1, -1, 0] == 1 and native[0, 0, 0] == 0
    assert native[-5:, -6:, :3].all() and not native[:10].any()


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_posted_dicom_with_the_predict_fields(
    tiny_run: dict[str, Any], tmp_path: Path
) -> None:
    import base64
    import json
    import os
    import signal
    import sys
    import urllib.error
    import urllib.request

    from simulations.local_superlink import free_port

    port = free_port()
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    model = "models:/radfl-classification-small-cnn-2d/1"
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [
            mlflow_cli,
            "models",
            "serve",
            "-m",
            model,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        # MLflow execs `uvicorn` by name: the venv's scripts must be on PATH (an active venv).
        env={
            **tiny_run["env"],
            "PATH": f"{Path(mlflow_cli).parent}{os.pathsep}{os.environ['PATH']}",
        },
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    ct = Path(get_testdata_file("CT_small.dcm"))
    body = {
        "dataframe_records": [
            {"content": base64.b64encode(ct.read_bytes()).decode(), "name": "CT_small.dcm"},
            {"content": base64.b64encode(b"not a dicom").decode(), "name": "broken.dcm"},
        ]
    }
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
                time.sleep(1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tiny_run["env"]["MLFLOW_TRACKING_URI"])
        direct = predict.predict(
            predict.load_model(model),
            [predict.Study(ct, "CT_small.dcm", "CT")],
            tmp_path,
            progress=False,
        )[0]
    good, bad = answer
    assert good["input"] == "CT_small.dcm" and good["error"] == "" and good["modality"] == "CT"
    assert good["p_1"] == pytest.approx(direct.loc[0, "p_1"], abs=1e-6)
    assert good["label"] == direct.loc[0, "label"]
    assert good["uncertainty"] == pytest.approx(direct.loc[0, "uncertainty"], abs=1e-6)
    assert bad["input"] == "broken.dcm"
    assert "cannot find a suitable reader for file: broken.dcm" in bad["error"]


def test_the_pyfunc_takes_paths_uploads_and_arrays_and_names_a_bad_row(tmp_path: Path) -> None:
    import base64

    import mlflow

    model = mlflow.pyfunc.load_model(str(_segmentation_model(tmp_path, 2, 32)))
    ct = Path(get_testdata_file("CT_small.dcm"))
    upload = base64.b64encode(ct.read_bytes()).decode()
    table = pd.DataFrame(
        {
            "path": [str(ct), None, None],
            "content": [None, upload, None],
            "name": [None, "a.dcm", None],
        }
    )
    answer = model.predict(table)
    assert list(answer["input"]) == [str(ct), "a.dcm", "row 2"]
    assert list(answer["error"])[:2] == ["", ""]
    assert "neither 'path' nor 'content'" in answer.loc[2, "error"]
    assert np.array_equal(np.asarray(answer.loc[0, "mask"]), np.asarray(answer.loc[1, "mask"]))
    assert np.asarray(answer.loc[0, "mask"]).shape == (128, 128)
    from_array = model.predict(np.random.default_rng(3).random((50, 70), dtype=np.float32))
    assert np.asarray(from_array.loc[0, "mask"]).shape == (50, 70)
    assert from_array.loc[0, "input"] == "array-0"


def _export(folder: Path, task: str, model: str) -> None:
    """Save a fresh ``model`` network of ``task`` as the coordinator logs it: an exported (pt2)
    program with RadFL's metadata."""
    from mlflow.models import Model

    from server.tracking import ServedPyTorch

    config = ModelConfig(task, model, 2, 32, 2, 0)
    ServedPyTorch.save_model(
        path=str(folder),
        mlflow_model=Model(),
        pytorch_model=get_task(config).build_model().eval(),
        serialization_format="pt2",
        input_example=np.zeros((1, 1, 32, 32), dtype=np.float32),
        metadata={"radfl": {**METADATA, "task": task, "model": model, "uncertainty": "mc-dropout"}},
        pip_requirements=["torch"],
    )


def test_gradcam_writes_an_overlay_per_study_from_the_exported_model(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    _export(folder, "classification", "small-cnn")
    study = tmp_path / "study.npy"
    np.save(study, np.random.default_rng(0).random((40, 40), dtype=np.float32))
    out = tmp_path / "out"
    assert predict.main([str(folder), str(study), "--out", str(out), "--quiet", "--gradcam"]) == 0
    table = pd.read_csv(out / "predictions.csv")
    overlay = Path(table.loc[0, "gradcam"])
    assert overlay.parent == out / "gradcam" and overlay.stat().st_size > 1000
    assert 0 <= table.loc[0, "uncertainty"] <= np.log(2)
    # The report's selective-prediction entropy, by the model's method (MC dropout here).
    model = predict.load_model(str(folder))
    image = predict.preprocess(predict.Study(study, "study.npy"), model.metadata)
    with torch.no_grad():
        logits = model.network(image)
    plain = -(torch.softmax(logits, 1) * torch.log_softmax(logits, 1)).sum() / np.log(2)
    assert 0 <= table.loc[0, "referral_entropy"] <= 1
    assert table.loc[0, "referral_entropy"] != pytest.approx(float(plain), abs=1e-9)


def test_gradcam_is_refused_by_name_for_an_ensemble_and_a_segmentation_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Grad-CAM explains one classification network: asked of a mean of several networks or of
    a mask, ``radfl predict --gradcam`` refuses before reading any input, naming the model."""
    study = tmp_path / "study.npy"
    np.save(study, np.zeros((40, 40), dtype=np.float32))
    classifier, segmenter = tmp_path / "classifier", tmp_path / "segmenter"
    _export(classifier, "classification", "small-cnn")
    _export(segmenter, "segmentation", "unet")
    cases = {f"{classifier},{classifier}": "an ensemble", str(segmenter): "a segmentation model"}
    for source, what in cases.items():
        out = tmp_path / f"out-{what.split()[-1]}"
        assert predict.main([source, str(study), "--out", str(out), "--gradcam"]) == 2
        error = capsys.readouterr().err
        assert f"--gradcam explains one classification network; model {source} is {what}" in error
        assert not out.exists()
