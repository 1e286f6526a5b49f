import argparse
import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import LoadImage
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from common import manifest
from common.errors import ConfigError
from common.synthetic import make_site, native_image_size, site_profiles
from common.tasks import task_class
from simulations import synth, synth_command

TINY = {"seed": 5, "samples_per_site": 12, "image_size": 32, "num_classes": 2}
TASKS_3D = ("segmentation", "detection", "instance")  # classification: the same images
TINY_3D = {"seed": 5, "samples_per_site": 8, "image_size": 16, "num_classes": 2}


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / manifest.MANIFEST_NAME).open(newline="") as handle:
        return list(csv.DictReader(handle))


def _load(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's note that nvImageCodec is absent
        return np.asarray(LoadImage(image_only=True)(str(path)))


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def federations(tmp_path_factory):
    """One 2D federation per task and 3D segmentation, detection and instance ones."""
    root = tmp_path_factory.mktemp("federations")
    written = {}
    for task in synth.TASKS:
        written[task, 2] = synth.write_federation(
            root / f"{task}-2d", synth.FederationSpec(sites=3, task=task, dims=2, **TINY)
        )
    for task in TASKS_3D:
        written[task, 3] = synth.write_federation(
            root / f"{task}-3d", synth.FederationSpec(sites=3, task=task, dims=3, **TINY_3D)
        )
    return written


@pytest.mark.parametrize(
    ("task", "dims"), [*((task, 2) for task in synth.TASKS), *((t, 3) for t in TASKS_3D)]
)
def test_manifests_are_valid(federations, task, dims):
    folders = federations[task, dims]
    assert [f.name for f in folders] == ["site-0", "site-1", "site-2"]
    expected_modality = ["CT", "MR", "DX" if dims == 2 else "OT"]
    for index, folder in enumerate(folders):
        rows = _rows(folder)
        assert rows
        columns = set(rows[0])
        assert set(manifest.REQUIRED_COLUMNS) <= columns
        assert set(task_class(task).required_columns) <= columns
        assert {manifest.SEX, manifest.AGE, manifest.MANUFACTURER, manifest.MODALITY} <= columns
        assert len({r[manifest.STUDY_ID] for r in rows}) == len(rows)
        for row in rows:
            for column in manifest.PATH_COLUMNS:
                if column in row:
                    assert (folder / row[column]).exists(), row[column]
            assert row[manifest.MODALITY] == expected_modality[index]
            assert row[manifest.SEX] in ("F", "M") and 30 <= int(row[manifest.AGE]) <= 85
            assert int(row[manifest.LABEL]) in (0, 1)
        assert len({r[manifest.MANUFACTURER] for r in rows}) == 1
    manufacturers = {_rows(f)[0][manifest.MANUFACTURER] for f in folders}
    assert len(manufacturers) == 3


def test_patients_have_several_studies_sharing_sex_and_age(federations):
    rows = [r for f in federations["classification", 2] for r in _rows(f)]
    by_patient: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_patient.setdefault(row[manifest.PATIENT_ID], []).append(row)
    multi = [studies for studies in by_patient.values() if len(studies) > 1]
    assert multi
    for studies in multi:
        assert len({(s[manifest.SEX], s[manifest.AGE]) for s in studies}) == 1


def test_sites_differ_in_native_resolution(federations):
    shapes = {_load(f / _rows(f)[0][manifest.IMAGE]).shape for f in federations["segmentation", 2]}
    assert len(shapes) > 1


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    args = {"sites": 3, "task": "instance", "dims": 2, **TINY}
    a = synth.write_federation(tmp_path / "a", synth.FederationSpec(**args))[0].parent
    b = synth.write_federation(tmp_path / "b", synth.FederationSpec(**args))[0].parent
    assert _files(a) == _files(b)
    c = synth.write_federation(tmp_path / "c", synth.FederationSpec(**{**args, "seed": 6}))[
        0
    ].parent
    assert _files(c) != _files(a)


def _local_contrast(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean inside ``mask`` minus mean of the body in a 2-voxel ring around it, in ring stds."""
    pool = torch.nn.functional.max_pool2d if mask.ndim == 2 else torch.nn.functional.max_pool3d
    near = pool(torch.from_numpy(mask)[None, None].float(), 5, 1, 2)[0, 0].numpy() > 0
    body = image > np.mean(np.percentile(image, [5, 95]))  # air is dark in every format
    ring = near & ~mask & body
    return float((image[mask].mean() - image[ring].mean()) / (image[ring].std() + 1e-6))


@pytest.mark.parametrize("dims", [2, 3])
def test_masks_line_up_with_lesions_as_monai_loads_them(tmp_path, dims):
    size = (
        {"samples_per_site": 30, "image_size": 32}
        if dims == 2
        else {"samples_per_site": 20, "image_size": 24}
    )
    folders = synth.write_federation(
        tmp_path, synth.FederationSpec(sites=3, task="segmentation", dims=dims, **{**TINY, **size})
    )
    for folder in folders:  # DICOM, NIfTI, PNG (3D: NumPy)
        aligned, transposed = [], []
        for row in _rows(folder):
            if row[manifest.LABEL] == "0":
                continue
            image = _load(folder / row[manifest.IMAGE])
            mask = _load(folder / row[manifest.MASK]) > 0
            assert image.shape == mask.shape and image.ndim == dims
            # Brighter than the rest of the image, and than the tissue around them (below).
            assert image[mask].mean() > image[~mask].mean(), row[manifest.IMAGE]
            aligned.append(_local_contrast(image, mask))
            transposed.append(_local_contrast(image, np.ascontiguousarray(mask.swapaxes(0, 1))))
        assert len(aligned) >= 2, folder
        assert np.mean(aligned) > 0.3 and np.mean(aligned) > np.mean(transposed) + 0.2, folder


@pytest.mark.parametrize("dims", [2, 3])
def test_loaded_arrays_keep_the_generator_axes(federations, dims):
    """MONAI returns every format with axis 0 = x, as ``make_site`` generated it."""
    for index, folder in enumerate(federations["segmentation", dims]):
        kwargs = TINY if dims == 2 else TINY_3D
        profile = site_profiles(3, kwargs["samples_per_site"], kwargs["seed"])[index]
        data = make_site(
            profile,
            index=index,
            image_size=native_image_size(profile, kwargs["image_size"]),
            spatial_dims=dims,
            num_classes=kwargs["num_classes"],
            seed=kwargs["seed"],
            follow_up_studies=True,
        )
        fmt = synth.site_format(index, dims)
        for i, row in enumerate(_rows(folder)[:3]):
            assert row[manifest.STUDY_ID] == data.study_ids[i]
            mask = _load(folder / row[manifest.MASK])
            assert np.array_equal(mask, data.masks[i, 0].numpy())
            image = _load(folder / row[manifest.IMAGE])
            expected = synth.stored_values(data, i, fmt).astype(np.float32)
            if index == 0:  # DICOM: MONAI applies RescaleIntercept, giving Hounsfield units
                expected += synth.CT_RESCALE_INTERCEPT
            assert np.array_equal(image, expected)


@pytest.mark.parametrize("dims", [2, 3])
def test_boxes_match_instance_masks(federations, dims):
    # Same seed and sizes: the detection and instance federations hold the same lesions.
    for boxed, labelled in zip(
        federations["detection", dims], federations["instance", dims], strict=True
    ):
        for box_row, instance_row in zip(_rows(boxed), _rows(labelled), strict=True):
            assert box_row[manifest.IMAGE] == instance_row[manifest.IMAGE]
            boxes = json.loads(box_row[manifest.BOXES])
            instances = _load(labelled / instance_row[manifest.INSTANCE_MASK]).astype(int)
            assert len(boxes) == instances.max()
            assert (len(boxes) > 0) == (box_row[manifest.LABEL] != "0")
            for k, box in enumerate(boxes, start=1):
                assert len(box) == 2 * dims + 1 and box[-1] == int(box_row[manifest.LABEL])
                start, end = box[:dims], box[dims:-1]
                assert all(
                    0 <= a < b <= s for a, b, s in zip(start, end, instances.shape, strict=True)
                )
                where = np.argwhere(instances == k)
                assert where.min(0).tolist() == start
                assert (where.max(0) + 1).tolist() == end


def test_dicom_tags_are_real_and_match_the_manifest(federations):
    folder = federations["classification", 2][0]
    rows = _rows(folder)
    uids = set()
    for row in rows[:10]:
        path = folder / row[manifest.IMAGE]
        assert path.read_bytes()[128:132] == b"DICM"
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.Modality == "CT" and ds.RescaleType == "HU"
        assert ds.PatientID == row[manifest.PATIENT_ID]
        assert ds.PatientSex == row[manifest.SEX]
        assert ds.PatientAge == f"{int(row[manifest.AGE]):03d}Y"
        assert ds.Manufacturer == row[manifest.MANUFACTURER]
        assert ds.Rows == ds.pixel_array.shape[0] and ds.BitsAllocated == 16
        assert float(ds.PixelSpacing[0]) > 0 and float(ds.SliceThickness) > 0
        uids.update([ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID])
        hounsfield = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert abs(np.median(hounsfield[hounsfield < -500]) - -1000) < 50  # air
        assert -50 < np.median(hounsfield[hounsfield > -200]) < 150  # soft tissue
    assert len(uids) == 30


def test_dicom_series_is_one_study_sorted_in_space(federations):
    folder = federations["segmentation", 3][0]
    row = _rows(folder)[0]
    series = sorted((folder / row[manifest.IMAGE]).iterdir())
    slices = [pydicom.dcmread(p) for p in series]
    volume = _load(folder / row[manifest.IMAGE])
    assert volume.shape[2] == len(slices) == volume.shape[0]
    assert [int(s.InstanceNumber) for s in slices] == list(range(1, len(slices) + 1))
    assert len({s.StudyInstanceUID for s in slices}) == len({s.SeriesInstanceUID for s in slices})
    assert len({s.SOPInstanceUID for s in slices}) == len(slices)
    z = [float(s.ImagePositionPatient[2]) for s in slices]
    assert np.allclose(np.diff(z), float(slices[0].SliceThickness))
    assert slices[0].PatientAge == f"{int(row[manifest.AGE]):03d}Y"


def test_nifti_mask_shares_the_dicom_geometry(federations):
    folder = federations["segmentation", 3][0]
    row = _rows(folder)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = LoadImage(image_only=True)(str(folder / row[manifest.IMAGE]))
        mask = LoadImage(image_only=True)(str(folder / row[manifest.MASK]))
    assert torch.allclose(image.affine, mask.affine, atol=1e-3)


def test_harder_subgroup_has_smaller_fainter_lesions_on_disk(tmp_path):
    folder = synth.write_federation(
        tmp_path,
        synth.FederationSpec(
            sites=2,
            task="instance",
            dims=2,
            seed=1,
            samples_per_site=80,
            image_size=32,
            num_classes=2,
        ),
    )[1]
    sizes: dict[str, list[float]] = {"F": [], "M": []}
    contrasts: dict[str, list[float]] = {"F": [], "M": []}
    for row in _rows(folder):
        image = _load(folder / row[manifest.IMAGE])
        instances = _load(folder / row[manifest.INSTANCE_MASK]).astype(int)
        for k in range(1, instances.max() + 1):
            lesion = torch.from_numpy(instances == k)
            near = torch.nn.functional.max_pool2d(lesion[None, None].float(), 7, 1, 3)[0, 0]
            ring = (near > 0).numpy() & (instances == 0)
            sizes[row[manifest.SEX]].append(lesion.sum().item())
            contrasts[row[manifest.SEX]].append(image[lesion.numpy()].mean() - image[ring].mean())
    assert np.mean(sizes["F"]) < 0.8 * np.mean(sizes["M"])
    assert np.mean(contrasts["F"]) < 0.8 * np.mean(contrasts["M"])


def test_ensure_federation_writes_once_and_redoes_an_interrupted_run(tmp_path, monkeypatch):
    calls = []
    write = synth.write_federation

    def counting_write(out, spec):
        calls.append(out)
        return write(out, spec)

    monkeypatch.setattr(synth, "write_federation", counting_write)
    params = {"sites": 2, "task": "detection", "dims": 2, **TINY}
    first = synth.ensure_federation(tmp_path, synth.FederationSpec(**params))
    assert len(calls) == 1 and all((f / manifest.MANIFEST_NAME).exists() for f in first)
    assert (
        synth.ensure_federation(tmp_path, synth.FederationSpec(**params)) == first
        and len(calls) == 1
    )

    other = synth.ensure_federation(tmp_path, synth.FederationSpec(**{**params, "seed": 9}))
    assert other[0].parent != first[0].parent and len(calls) == 2

    root = first[0].parent
    (root / synth.COMPLETE_MARKER).unlink()  # as if the process died before finishing
    (first[1] / manifest.MANIFEST_NAME).unlink()
    assert (
        synth.ensure_federation(tmp_path, synth.FederationSpec(**params)) == first
        and len(calls) == 3
    )
    assert (root / synth.COMPLETE_MARKER).exists()
    assert (first[1] / manifest.MANIFEST_NAME).exists()


def test_refuses_to_mix_with_an_existing_site_and_bad_arguments(tmp_path):
    (tmp_path / "site-1").mkdir()
    (tmp_path / "site-1" / "old.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="site-1"):
        synth.write_federation(
            tmp_path, synth.FederationSpec(sites=2, task="classification", dims=2, **TINY)
        )
    with pytest.raises(ConfigError, match="task"):
        synth.write_federation(
            tmp_path / "x", synth.FederationSpec(sites=2, task="ranking", dims=2, **TINY)
        )


def test_cli_prints_one_line_per_site(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    synth_command.add_arguments(parser)
    args = parser.parse_args(
        [
            "--out",
            str(tmp_path),
            "--sites",
            "3",
            "--dims",
            "3",
            "--samples-per-site",
            "8",
            "--image-size",
            "16",
            "--task",
            "segmentation",
        ]
    )
    assert synth_command.synth(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert "dicom" in lines[0] and "nifti" in lines[1] and "npy" in lines[2]
    assert all("rows" in line and "prevalence" in line for line in lines)


@pytest.mark.parametrize("dims", [2, 3])
def test_site_folders_load_boxes_and_instances_on_the_training_grid(federations, tmp_path, dims):
    """Every format: the detection loader's boxes (drawn, oriented and resized with the
    image) agree with the boxes of the instance loader's masks, and sit on the lesions."""
    from client.data import SiteDataset, read_manifest

    size = 24  # at least every site's native size in 3D: no lesion is smaller than a voxel
    checked, differences = 0, []
    for boxed, labelled in zip(
        federations["detection", dims], federations["instance", dims], strict=True
    ):
        detection, instance = (
            SiteDataset(
                read_manifest(folder, task),
                folder,
                task=task,
                spatial_dims=dims,
                image_size=size,
                cache_dir=tmp_path / task / folder.name,
            )
            for folder, task in ((boxed, "detection"), (labelled, "instance"))
        )
        assert len(detection) == len(instance)
        for index in range(len(detection)):
            box_item, instance_item = detection[index], instance[index]
            boxes = box_item["label"]["boxes"]
            target = instance_item["label"]
            assert boxes.shape == target["boxes"].shape == (len(target["masks"]), 2 * dims)
            assert torch.equal(box_item["label"]["labels"], target["labels"])
            # Exact box scaling against a nearest-neighbour resized mask: within a voxel or so.
            differences.append((boxes - target["boxes"]).abs().reshape(-1))
            image = instance_item["image"][0]
            for mask in target["masks"]:
                assert image[mask].mean() > image[~target["masks"].any(0)].mean()
                checked += 1
    assert checked >= 5
    difference = torch.cat(differences)
    assert difference.max() <= 1.5 and difference.mean() < 0.6, difference
    # Shrunk far below the native size, every instance keeps at least one voxel.
    folder = federations["instance", dims][1]
    shrunk = SiteDataset(
        read_manifest(folder, "instance"),
        folder,
        task="instance",
        spatial_dims=dims,
        image_size=6,
        cache_dir=tmp_path / "shrunk",
    )
    rows = _rows(folder)
    for index in range(len(shrunk)):
        native = _load(folder / rows[index][manifest.INSTANCE_MASK])
        assert len(shrunk[index]["label"]["masks"]) == len(np.unique(native[native > 0]))


@pytest.mark.parametrize("dims", [2, 3])
def test_a_hospitals_storage_format_does_not_set_its_image_level(federations, tmp_path, dims):
    """CT is windowed in HU, MR and X-ray are percentile-scaled: before the per-image z-score
    the synthetic hospitals' mean image was 0.19, 0.33 and 0.41 (in the order of their
    prevalence), a level a pooled model learnt as the hospital. Every format now loads with
    the level and spread of the in-memory hospitals: mean 0 and unit variance per image."""
    from client.data import SiteDataset, read_manifest

    task = "classification" if dims == 2 else "segmentation"
    folders = federations[task, dims]
    assert len(folders) == 3  # CT, MR and X-ray (or .npy in 3D)
    for folder in folders:
        site = SiteDataset(
            read_manifest(folder, task),
            folder,
            task=task,
            spatial_dims=dims,
            image_size=16,
            cache_dir=tmp_path / folder.name,
        )
        images = torch.stack([site[index]["image"] for index in range(len(site))])
        flat = images.reshape(len(images), -1)
        assert flat.mean(dim=1).abs().max() < 1e-4, folder.name
        assert (flat.std(dim=1, unbiased=False) - 1).abs().max() < 1e-3, folder.name
