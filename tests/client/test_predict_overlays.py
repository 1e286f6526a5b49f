"""PNG overlays of ``radfl predict``: what is tinted, boxed and heat-coloured lies where the
prediction is, in the picture's orientation (2D as stored, volumes radiological)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.data import get_testdata_file

from client import predict
from client.predict_overlays import windowed_image, write_heat_map, write_overlay

CAPTION_ROWS = 15  # the caption's black band at the top


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _tinted(picture: np.ndarray, zoom: int) -> np.ndarray:
    """Which image pixels are coloured (grey has equal channels), one per image pixel."""
    centres = picture[zoom // 2 :: zoom, zoom // 2 :: zoom]
    return centres[..., 0] != centres[..., 1]  # type: ignore[no-any-return]


def test_a_mask_is_tinted_exactly_on_its_pixels_of_the_stored_image(tmp_path: Path) -> None:
    ct = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    image = windowed_image(ct, "CT", {"ct_window_hu": [40.0, 400.0]})
    assert image.shape == (1, 128, 128) and 0 <= float(image.min()) <= float(image.max()) <= 1
    labels = np.zeros((128, 128), dtype=np.uint8)
    labels[10:40, 70:100] = 1  # MONAI's axes: columns 10-39, rows 70-99
    picture = _pixels(write_overlay(tmp_path / "seg.png", image, labels=labels))
    zoom = picture.shape[0] // 128
    assert picture.shape == (128 * zoom, 128 * zoom, 3) and zoom == 3
    assert np.array_equal(_tinted(picture, zoom), labels.T > 0)


def test_a_volume_is_drawn_radiologically_at_its_labels_slice_with_the_boxes(
    tmp_path: Path,
) -> None:
    import nibabel as nib

    path = tmp_path / "ras.nii.gz"
    volume = np.random.default_rng(0).random((20, 24, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 2.5, 1.0])), str(path))
    image = windowed_image(path, "MR", {"ct_window_hu": [40.0, 400.0]})
    labels = np.zeros((20, 24, 12), dtype=np.uint8)
    labels[0:5, 0:6, 7] = 1  # the patient's left (RAS x low) and back (y low), slice 7
    near = np.array([[10.0, 10.0, 6.0, 14.0, 14.0, 9.0]])  # crosses slice 7
    far = np.array([[2.0, 15.0, 0.0, 4.0, 18.0, 2.0]])  # slices 0-1 only
    picture = _pixels(
        write_overlay(
            tmp_path / "vol.png",
            image,
            labels=labels,
            boxes=np.concatenate([near, far]),
            box_texts=["1 0.90", "1 0.50"],
        )
    )
    zoom = picture.shape[0] // 24
    tinted = _tinted(picture, zoom)
    assert tinted.shape == (24, 20)  # rows: anterior to posterior; columns: right to left
    # Radiological: the patient's left on the viewer's right, the back at the bottom.
    assert tinted[18:, 15:].all()
    assert not tinted[18:, :15].any() and not tinted[:6].any()
    # The near box, flipped the same way: RAS x 10-13 -> LPS 6-9, y 10-13 -> 10-13.
    top_edge = picture[10 * zoom, 6 * zoom : 10 * zoom]
    assert (top_edge == (255, 64, 64)).all()
    assert not tinted[11:13, 7:9].any()  # a box is an outline
    # The far box (LPS x 16-17, y 6-8) is on no drawn slice.
    assert not tinted[6:9, 16:18].any()


def test_a_heat_map_on_the_network_grid_is_drawn_on_the_inputs_own_grid(tmp_path: Path) -> None:
    ct = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    heat = np.zeros((32, 32), dtype=np.float32)
    heat[:8, :8] = 1.0  # network grid, MONAI's axes: the first columns and rows
    picture = _pixels(
        write_heat_map(tmp_path / "cam.png", ct, "CT", {"ct_window_hu": [40.0, 400.0]}, heat)
    )
    zoom = picture.shape[0] // 128
    hot = picture[CAPTION_ROWS + 5, 5]  # top left (below no caption: none was given)
    cold = picture[-5, -5]
    assert hot[0] > hot[2] and cold[2] > cold[0]  # jet: red where hot, blue where cold
    assert picture.shape[:2] == (128 * zoom, 128 * zoom)


def test_predict_overlays_writes_one_picture_per_input_with_its_caption(tmp_path: Path) -> None:
    from mlflow.models import Model

    from common.tasks.base import ModelConfig, get_task
    from server.tracking import ServedPyTorch
    from tests.client.test_predict import METADATA

    network = get_task(ModelConfig("classification", "small-cnn", 2, 32, 2, 0)).build_model()
    model = tmp_path / "model"
    ServedPyTorch.save_model(
        path=str(model),
        mlflow_model=Model(),
        pytorch_model=network.eval(),
        serialization_format="pickle",
        metadata={"radfl": METADATA},
        pip_requirements=["torch"],
    )
    ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
    out = tmp_path / "out"
    argv = [str(model), str(ct), str(mr), "--out", str(out), "--overlays", "--quiet"]
    assert predict.main(argv) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 2
    for path in table["overlay"]:
        picture = _pixels(Path(path))
        caption = picture[:CAPTION_ROWS]
        assert ((caption[..., 0] > 200) & (caption[..., 2] < 50)).any()  # yellow text
        body = picture[CAPTION_ROWS:]
        assert (body[..., 0] == body[..., 1]).all()  # the image itself, grey
    plain = tmp_path / "plain"
    assert predict.main([str(model), str(ct), "--out", str(plain), "--quiet"]) == 0
    assert "overlay" not in pd.read_csv(plain / "predictions.csv").columns
    assert not (plain / "overlays").exists()
