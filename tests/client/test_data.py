"""Site data loading: manifest, MONAI readers and preprocessing, DICOM subgroups, the cache.

Real files come from the installed packages (pydicom's bundled test files, nibabel's test data);
small synthetic sites are written to ``tmp_path``. The writers here are shared with
``test_check.py``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from client.data import (
    SiteDataError,
    SiteDataset,
    decode_image,
    fill_subgroups_from_dicom,
    image_transforms,
    parse_dicom_age,
    read_manifest,
)

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def standardized(values: np.ndarray) -> np.ndarray:
    """The last intensity step: zero mean and unit (population) variance over the image."""
    return (values - values.mean()) / values.std()


def assert_standardized(image: torch.Tensor) -> None:
    assert abs(float(image.mean())) < 1e-4
    assert abs(float(image.std(unbiased=False)) - 1.0) < 1e-4


def bundled_dicom(name: str) -> Path:
    """A test file shipped inside the pydicom wheel (never one pydicom would download)."""
    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.is_file():
        pytest.skip(f"pydicom does not ship {name}")
    return path


# ---------------------------------------------------------------------------------------------
# Writers of tiny test images
# ---------------------------------------------------------------------------------------------


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    modality: str = "CT",
    sex: str = "F",
    age: str = "063Y",
    manufacturer: str = "ACME",
    z_mm: float = 0.0,
    instance: int = 1,
    series_uid: str | None = None,
) -> Path:
    """A one-slice int16 DICOM (CT rescale: HU = value - 1024)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.PatientSex = sex
    ds.PatientAge = age
    ds.Manufacturer = manufacturer
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelSpacing = [0.8, 0.8]
    ds.SliceThickness = 2.0
    ds.ImagePositionPatient = [0.0, 0.0, z_mm]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.InstanceNumber = instance
    ds.PixelData = pixels.astype(np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, volume: np.ndarray, **tags: str) -> Path:
    """A DICOM series folder, one file per slice along the last axis."""
    uid = generate_uid()
    for k in range(volume.shape[-1]):
        write_dicom(
            folder / f"slice{k:03d}.dcm",
            volume[..., k],
            z_mm=2.0 * k,
            instance=k + 1,
            series_uid=uid,
            **tags,
        )
    return folder


def write_nifti(path: Path, volume: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    return path


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def write_manifest(root: Path, header: str, *rows: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "manifest.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------------


def test_read_manifest_indexes_rows_by_csv_line(tmp_path: Path) -> None:
    write_manifest(
        tmp_path,
        "image,patient_id,study_id,label,note",
        'a.png,p1,s1,0,"a note on',  # a quoted value spanning lines 2 and 3
        'two lines"',
        "",  # a blank line still counts: the next row is on line 5
        '"b.png",p2,s2, 1 ,',
    )
    table = read_manifest(tmp_path, "classification")
    assert list(table.index) == [2, 5]
    assert table.index.name == "line"
    assert table.loc[2, "note"] == "a note on\ntwo lines"
    assert table.loc[5, "image"] == "b.png"
    assert table.loc[5, "label"] == "1"


def test_read_manifest_names_file_and_missing_columns(tmp_path: Path) -> None:
    write_manifest(tmp_path, "image,study_id", "a.png,s1")
    with pytest.raises(
        SiteDataError, match=r"manifest\.csv: missing column\(s\) patient_id, label"
    ):
        read_manifest(tmp_path, "classification")
    with pytest.raises(SiteDataError, match="unknown task"):
        read_manifest(tmp_path, "regression")
    with pytest.raises(SiteDataError, match="not found"):
        read_manifest(tmp_path / "nowhere", "classification")


def test_read_manifest_rejects_rows_longer_than_the_header(tmp_path: Path) -> None:
    write_manifest(tmp_path, "image,patient_id,study_id,label", "a.png,p1,s1,0,extra")
    with pytest.raises(SiteDataError, match="line 2 has 5 cells but the header has 4"):
        read_manifest(tmp_path, "classification")


# ---------------------------------------------------------------------------------------------
# Real DICOM and NIfTI files that the installed packages ship
# ---------------------------------------------------------------------------------------------


def test_ct_small_is_windowed_in_hounsfield_units() -> None:
    path = bundled_dicom("CT_small.dcm")
    source = pydicom.dcmread(path)
    hu = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
    # Soft-tissue window 40/400: HU -160 -> 0, HU 240 -> 1, clipped; then standardized.
    expected = standardized(np.clip((hu + 160.0) / 400.0, 0.0, 1.0))

    native = image_transforms(2, source.Rows, "CT")({"image": str(path)})["image"]
    assert native.shape == (1, source.Rows, source.Columns)
    # MONAI's readers put the column index first (PydicomReader swap_ij): hence the transpose.
    np.testing.assert_allclose(native[0].numpy(), expected.T, atol=1e-5)

    resized = image_transforms(2, 32, "CT")({"image": str(path)})["image"]
    assert type(resized) is torch.Tensor  # plain tensor, no MONAI metadata
    assert resized.dtype == torch.float32 and resized.shape == (1, 32, 32)
    assert_standardized(resized)


def test_mr_small_is_percentile_scaled() -> None:
    path = bundled_dicom("MR_small.dcm")
    pixels = pydicom.dcmread(path).pixel_array.astype(np.float64)
    low, high = np.percentile(pixels, [0.5, 99.5])
    expected = standardized(np.clip((pixels - low) / (high - low), 0.0, 1.0))

    native = image_transforms(2, pixels.shape[0], "MR")({"image": str(path)})["image"]
    np.testing.assert_allclose(native[0].numpy(), expected.T, atol=1e-5)
    resized = image_transforms(2, 24, "MR")({"image": str(path)})["image"]
    assert resized.shape == (1, 24, 24)
    assert_standardized(resized)


def test_nibabel_anatomical_volume_loads_in_3d() -> None:
    path = NIBABEL_DATA / "anatomical.nii"
    # 33×41×25 voxels of 2 mm, big-endian int16
    image = image_transforms(3, 16, None)({"image": str(path)})["image"]
    assert image.shape == (1, 16, 16, 16)
    assert torch.isfinite(image).all()
    assert_standardized(image)


def test_dicom_subgroups_come_from_ct_small_header(tmp_path: Path) -> None:
    shutil.copy(bundled_dicom("CT_small.dcm"), tmp_path / "ct.dcm")
    shutil.copy(bundled_dicom("MR_small.dcm"), tmp_path / "mr.dcm")
    write_manifest(
        tmp_path, "image,patient_id,study_id,label,sex", "ct.dcm,p1,s1,0,", "mr.dcm,p2,s2,1,M"
    )
    table = fill_subgroups_from_dicom(read_manifest(tmp_path, "classification"), tmp_path)
    ct = table.loc[2]
    # CT_small.dcm: PatientSex O, PatientAge 000Y, Manufacturer GE MEDICAL SYSTEMS, Modality CT.
    assert (ct["sex"], ct["age"], ct["manufacturer"], ct["modality"]) == (
        "O",
        "0",
        "GE MEDICAL SYSTEMS",
        "CT",
    )
    mr = table.loc[3]
    assert mr["sex"] == "M"  # the manifest's value wins over PatientSex F
    assert (mr["manufacturer"], mr["modality"]) == ("TOSHIBA_MEC", "MR")


@pytest.mark.parametrize(
    ("value", "years"),
    [("063Y", "63"), ("018M", "1"), ("010W", "0"), ("003D", "0"), ("", ""), ("abc", "")],
)
def test_parse_dicom_age(value: str, years: str) -> None:
    assert parse_dicom_age(value) == years


# ---------------------------------------------------------------------------------------------
# Synthetic files: series folders, PNG channels, NumPy arrays
# ---------------------------------------------------------------------------------------------


def test_dicom_series_folder_loads_as_one_volume(tmp_path: Path) -> None:
    volume = rng().integers(900, 1200, size=(16, 16, 6))
    folder = write_series(tmp_path / "series", volume)
    assert decode_image(folder).shape == (1, 16, 16, 6)
    image = image_transforms(3, 8, "CT")({"image": str(folder)})["image"]
    assert image.shape == (1, 8, 8, 8) and torch.isfinite(image).all()


def test_greyscale_stored_as_rgb_becomes_one_channel(tmp_path: Path) -> None:
    grey = rng().integers(0, 255, size=(20, 24))
    path = write_png(tmp_path / "x.png", np.stack([grey] * 3, axis=-1))
    image = image_transforms(2, 16, None)({"image": str(path)})["image"]
    assert image.shape == (1, 16, 16)


def test_npy_volume_loads(tmp_path: Path) -> None:
    path = tmp_path / "v.npy"
    np.save(path, rng().normal(size=(12, 12, 12)).astype(np.float32))
    assert image_transforms(3, 8, "MR")({"image": str(path)})["image"].shape == (1, 8, 8, 8)


# ---------------------------------------------------------------------------------------------
# SiteDataset and its cache
# ---------------------------------------------------------------------------------------------


def _png_site(root: Path, count: int = 4) -> None:
    rows = []
    for i in range(count):
        write_png(root / "img" / f"{i}.png", rng(i).integers(0, 255, size=(20, 20)))
        rows.append(f"img/{i}.png,p{i},s{i},{i % 2},M,50")
    write_manifest(root, "image,patient_id,study_id,label,sex,age", *rows)


def test_site_dataset_items_and_labels(tmp_path: Path) -> None:
    _png_site(tmp_path)
    table = read_manifest(tmp_path, "classification")
    dataset = SiteDataset(table, tmp_path, task="classification", spatial_dims=2, image_size=16)
    assert len(dataset) == 4
    assert dataset.labels.dtype == torch.long and dataset.labels.tolist() == [0, 1, 0, 1]
    assert dataset.decode_count == 0  # labels are known without decoding
    item = dataset[1]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 16, 16)
    assert item["label"].dtype == torch.long and item["label"].ndim == 0
    assert int(item["label"]) == 1


def test_second_pass_reads_the_cache_not_the_files(tmp_path: Path) -> None:
    _png_site(tmp_path)
    table = read_manifest(tmp_path, "classification")

    def dataset() -> SiteDataset:
        return SiteDataset(table, tmp_path, task="classification", spatial_dims=2, image_size=16)

    first = dataset()
    epoch_1 = [first[i]["image"] for i in range(len(first))]
    assert first.decode_count == 4
    assert len(list(first.cache_dir.glob("*.pt"))) == 4
    assert first.cache_dir.parent == tmp_path / ".radfl-cache"
    epoch_2 = [first[i]["image"] for i in range(len(first))]
    assert first.decode_count == 4

    # A later round in a new process: a fresh dataset finds every row in the cache.
    later = dataset()
    epoch_3 = [later[i]["image"] for i in range(len(later))]
    assert later.decode_count == 0
    for a, b, c in zip(epoch_1, epoch_2, epoch_3, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)

    # An image rewritten in place is decoded again; other settings use another folder.
    write_png(tmp_path / "img" / "0.png", rng(99).integers(0, 255, size=(20, 21)))
    changed = dataset()
    _ = [changed[i] for i in range(len(changed))]
    assert changed.decode_count == 1
    bigger = SiteDataset(table, tmp_path, task="classification", spatial_dims=2, image_size=8)
    assert bigger.cache_dir != first.cache_dir


def test_site_dataset_names_line_and_file_of_a_bad_image(tmp_path: Path) -> None:
    _png_site(tmp_path, count=2)
    (tmp_path / "img" / "1.png").write_text("not a png")
    dataset = SiteDataset(
        read_manifest(tmp_path, "classification"),
        tmp_path,
        task="classification",
        spatial_dims=2,
        image_size=8,
        cache_dir=tmp_path / "elsewhere",
    )
    assert dataset.cache_dir.parent == tmp_path / "elsewhere"
    with pytest.raises(SiteDataError, match=r"line 3: img/1\.png"):
        dataset[1]


def test_bad_boxes_and_unknown_tasks_are_refused_naming_the_line(tmp_path: Path) -> None:
    write_manifest(
        tmp_path,
        "image,patient_id,study_id,boxes",
        "a.png,p1,s1,[]",
        'b.png,p2,s2,"[[1,2,3]]"',
    )
    table = read_manifest(tmp_path, "detection")
    with pytest.raises(SiteDataError, match="line 3: boxes must be lists of 5 numbers"):
        SiteDataset(table, tmp_path, task="detection", spatial_dims=2, image_size=8)
    with pytest.raises(SiteDataError, match="task 'ranking' has no site loader"):
        SiteDataset(table, tmp_path, task="ranking", spatial_dims=2, image_size=8)


def test_segmentation_loads_each_mask_on_its_image_grid(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for i, (x, y) in enumerate([(4, 20), (18, 6)]):
        image = (40 + 20 * rng.random((32, 32))).astype(np.uint8)
        mask = np.zeros((32, 32), dtype=np.uint8)
        image[x : x + 6, y : y + 6] = 230
        mask[x : x + 6, y : y + 6] = 1
        Image.fromarray(image).save(tmp_path / "img" / f"{i}.png")
        Image.fromarray(mask).save(tmp_path / "mask" / f"{i}.png")
        rows.append(f"img/{i}.png,p{i},s{i},mask/{i}.png")
    write_manifest(tmp_path, "image,patient_id,study_id,mask", *rows)

    def load() -> SiteDataset:
        table = read_manifest(tmp_path, "segmentation")
        return SiteDataset(table, tmp_path, task="segmentation", spatial_dims=2, image_size=16)

    dataset = load()
    for index in range(2):
        item = dataset[index]
        label = item["label"]
        assert label.shape == (1, 16, 16) and label.dtype == torch.int64
        assert set(label.unique().tolist()) == {0, 1}  # nearest neighbour: no blended values
        inside = item["image"][label > 0].mean()
        assert inside > item["image"][label == 0].mean() + 0.4  # the mask sits on the lesion
    (tmp_path / "mask" / "1.png").unlink()
    with pytest.raises(SiteDataError, match="line 3"):
        load()


def replace_keeping_size_and_mtime(path: Path, content: bytes, *, in_place: bool) -> None:
    """Give ``path`` other bytes of the same length with its modification time set back: by a
    rename over it (a new inode) or a write into it (the same inode)."""
    assert len(content) == path.stat().st_size
    before = path.stat()
    # Kernel file times are coarse (a clock tick): let the clock move past the first write.
    time.sleep(0.05)
    if in_place:
        with path.open("r+b") as handle:
            handle.write(content)
    else:
        replacement = path.with_name(f".{path.name}.new")
        replacement.write_bytes(content)
        os.replace(replacement, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    # What a key of size and modification time alone would see: nothing changed.
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def _npy_bytes(seed: int, tmp_path: Path) -> bytes:
    path = tmp_path / f".seed-{seed}.npy"
    np.save(path, rng(seed).normal(size=(20, 20)).astype(np.float32))
    return path.read_bytes()


@pytest.mark.parametrize("in_place", [False, True], ids=["replaced", "rewritten-in-place"])
def test_a_file_changed_with_size_and_mtime_kept_is_decoded_again_not_read_from_the_cache(
    tmp_path: Path, in_place: bool
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    for i in range(2):
        (site / f"{i}.npy").write_bytes(_npy_bytes(i, tmp_path))
    write_manifest(site, "image,patient_id,study_id,label", "0.npy,p0,s0,0", "1.npy,p1,s1,1")
    table = read_manifest(site, "classification")

    def dataset() -> SiteDataset:
        return SiteDataset(table, site, task="classification", spatial_dims=2, image_size=16)

    first = dataset()
    cached = first[0]["image"]
    replace_keeping_size_and_mtime(site / "0.npy", _npy_bytes(7, tmp_path), in_place=in_place)

    later = dataset()
    fresh = later[0]["image"]
    assert later.decode_count == 1  # decoded again, not the stale cached tensor
    assert not torch.equal(fresh, cached)


def test_pooled_training_sets_collate_when_only_some_parts_have_lesion_masks() -> None:
    """A site with lesion masks pooled with one without (centralized training), or a site's
    labelled studies with its pseudo-labelled ones: the lesion is the final evaluation's
    alone, and a batch mixing both must still collate."""
    from torch.utils.data import DataLoader

    from client.datasets import ConcatLabelled, SampleDataset

    images, labels = torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    with_lesions = SampleDataset(images, labels, lesions=torch.zeros(4, 1, 8, 8))
    assert "lesion" in with_lesions[0]
    pooled = ConcatLabelled([with_lesions, SampleDataset(images, labels)])
    batch = next(iter(DataLoader(pooled, batch_size=8)))
    assert set(batch) == {"image", "label"} and len(batch["label"]) == 8
