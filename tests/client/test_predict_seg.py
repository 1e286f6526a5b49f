"""DICOM SEG of a series folder and of a multi-frame file: each SEG frame, found through the
source instance or frame it references (highdicom), equals the NIfTI mask's slice that MONAI's
reader made of that instance or frame (told apart by a mark in each slice's corner)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from client import predict
from client.preprocessing import decode_image
from tests.client.test_predict import _segmentation_model

#: Slice positions (mm) in file order; InstanceNumber runs 2, 4, 1, 3, so the reader's order
#: (by InstanceNumber) is neither the files' nor the positions'.
POSITIONS_MM = (10.0, 0.0, 15.0, 5.0)
INSTANCE_NUMBERS = (2, 4, 1, 3)


def _series(folder: Path) -> list[pydicom.Dataset]:
    """pydicom's CT_small.dcm without its birth date as four slices of one series, each rolled
    sideways by its own amount and with a mark (a raw value 1000 + 100 * file index in its
    first 4 x 4 pixels)."""
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    # As the synthetic sites write them: no birth date, which highdicom reads from the source.
    del base.PatientBirthDate
    folder.mkdir()
    series_uid = generate_uid()
    datasets = []
    for index, (z, number) in enumerate(zip(POSITIONS_MM, INSTANCE_NUMBERS, strict=True)):
        dataset = copy.deepcopy(base)
        dataset.SOPInstanceUID = generate_uid()
        dataset.SeriesInstanceUID = series_uid
        dataset.ImagePositionPatient = [*base.ImagePositionPatient[:2], z]
        dataset.InstanceNumber = number
        # Rolled by a different amount per slice, so that each slice's mask differs.
        pixels = np.roll(dataset.pixel_array, 32 * index, axis=1)
        pixels[:4, :4] = 1000 + 100 * index
        dataset.PixelData = pixels.tobytes()
        dataset.save_as(folder / f"slice-{index}.dcm")
        datasets.append(dataset)
    return datasets


def _multiframe(datasets: list[pydicom.Dataset], path: Path) -> Path:
    """The series as one enhanced multi-frame CT file (highdicom's legacy conversion)."""
    import highdicom as hd

    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets,
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    image.save_as(path)
    return path


def test_dicom_seg_frames_of_a_series_and_a_multiframe_file_match_the_nifti_mask(
    tmp_path: Path,
) -> None:
    import highdicom as hd
    import nibabel as nib

    datasets = _series(tmp_path / "series")
    multiframe = _multiframe(datasets, tmp_path / "multiframe.dcm")
    model = _segmentation_model(tmp_path, spatial_dims=3, image_size=32)
    out = tmp_path / "out"
    series, inputs = tmp_path / "series", [str(tmp_path / "series"), str(multiframe)]
    assert predict.main([str(model), *inputs, "--out", str(out), "--quiet"]) == 0
    table = pd.read_csv(out / "predictions.csv").set_index("input")

    # The series: the reader stacks slices last, (columns, rows, slices).
    mask = np.asarray(nib.load(table.loc[str(series), "mask"]).dataobj)
    assert mask.shape == (128, 128, 4)
    assert 0 < int((mask > 0).sum()) < mask.size  # both background and foreground
    decoded = np.asarray(decode_image(series))[0]
    seg = hd.seg.segread(table.loc[str(series), "dicom_seg"])
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert int(seg.NumberOfFrames) == 4
    assert seg.PatientBirthDate == "" and seg.PatientID == datasets[0].PatientID
    for index, dataset in enumerate(datasets):
        # The reader's slice of this file, by its mark (HU: raw - 1024).
        (where,) = np.flatnonzero(decoded[0, 0, :] == 1000 + 100 * index - 1024)
        frame = seg.get_pixels_by_source_instance([dataset.SOPInstanceUID], segment_numbers=[1])
        assert np.array_equal(frame[0, :, :, 0] > 0, mask[:, :, where].T > 0), index

    # The multi-frame file: the reader swaps frames and rows, (rows, frames, columns).
    mask = np.asarray(nib.load(table.loc[str(multiframe), "mask"]).dataobj)
    source = pydicom.dcmread(multiframe)
    assert mask.shape == (128, int(source.NumberOfFrames), 128)
    assert 0 < int((mask > 0).sum()) < mask.size
    decoded = np.asarray(decode_image(multiframe))[0]
    seg = hd.seg.segread(table.loc[str(multiframe), "dicom_seg"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    for number in range(1, int(source.NumberOfFrames) + 1):
        mark = source.pixel_array[number - 1, 0, 0]
        (where,) = np.flatnonzero(decoded[0, :, 0] == mark)
        frame = seg.get_pixels_by_source_frame(source.SOPInstanceUID, [number], segment_numbers=[1])
        assert np.array_equal(frame[0, :, :, 0] > 0, mask[:, where, :] > 0), number


def test_a_mask_that_does_not_stack_the_series_is_refused_by_name(tmp_path: Path) -> None:
    from client.predict_outputs import source_frames
    from common.errors import SiteDataError

    _series(tmp_path / "series")
    with pytest.raises(SiteDataError, match="does not stack the series' 4 slices"):
        source_frames(np.zeros((128, 128, 3), dtype=np.uint8), tmp_path / "series")
