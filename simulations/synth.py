"""``radfl synth``: synthetic hospitals written to disk in the formats real sites hold.

Each site folder ``OUT/site-<i>`` holds a ``manifest.csv`` (see ``common.manifest``) and the files
it names. The images come from ``common.synthetic.make_site`` at the site's native resolution,
with follow-up studies, so patients have several studies and a sex and age; lesions of the
harder subgroup (``common.synthetic.HARDER_SUBGROUP``) are smaller and fainter.

Formats cycle by site index (``SITE_FORMATS``):

- ``dicom`` (0, 3, ...): CT. 2D: one DICOM file per study. 3D: one folder per study holding a
  series, one file per slice, which the manifest's ``image`` names. Stored values are
  ``HU + 1024`` (``RescaleIntercept`` -1024): air about -1000 HU, soft tissue about 40 HU,
  lesions 35 to 100 HU above it. Masks are NIfTI (``.nii.gz``) on the same grid, with the affine
  of the DICOM geometry in RAS.
- ``nifti`` (1, 4, ...): MR-like magnitudes (positive, arbitrary units) in ``.nii.gz``; masks
  likewise.
- ``png`` (2, 5, ...): X-ray-like 16-bit grayscale PNG (modality ``DX``), 12 bits used; masks as
  8-bit PNG. PNG cannot hold a volume, so in 3D this site writes NumPy ``.npy`` arrays instead
  (images uint16, modality ``OT``; masks uint8).

Axis convention: every array is written so that MONAI's ``LoadImage`` (``NibabelReader``,
``PydicomReader`` and ``PILReader`` with their defaults, or ``NumpyReader``) returns it with
array axis 0 = x (image column, patient right-to-left in DICOM), axis 1 = y (image row, anterior
to posterior), axis 2 = z (slice). A PNG stores row-major ``(y, x)``, and DICOM ``Rows`` run along
y, and both readers swap the first two axes back by default. Boxes in the manifest's ``boxes``
column use those loaded-array indices: ``[x0, y0, x1, y1, class]`` in 2D and
``[x0, y0, z0, x1, y1, z1, class]`` in 3D, where ``x0`` is the first voxel index of the lesion
and ``x1`` one past its last (half-open, so ``image[x0:x1, y0:y1]`` is the box and ``x1 - x0``
its width, as in ``monai.data.box_utils``). Instance masks hold ``k`` on lesion ``k``; semantic
masks hold the lesion kind (1 for two classes).

The manifest always has ``label`` (the image's class, 0 = no finding) besides the task's own
label column; mask and instance files are written only for the tasks that name them. The
``multilabel`` task's sites carry a second planted finding and a ``labels`` column of two 0/1
flags (``common.synthetic``). ``--hide-labels FRACTION`` leaves the labels of that share of each
site's training-split patients blank: unlabelled studies for pseudo-labelling
(``client.pseudo_labels``).

Everything is deterministic in the seed: the same arguments write byte-identical files.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from common import manifest
from common.config import ClientConfig, default_run_config, from_run_config
from common.errors import ConfigError
from common.splits import TRAIN, SplitFractions, assign_splits
from common.synthetic import (
    SiteData,
    SiteProfile,
    make_site,
    native_image_size,
    plant_shortcut,
    site_profiles,
)
from common.tasks import list_tasks, task_class

SITE_FORMATS = ("dicom", "nifti", "png")
TASKS = tuple(list_tasks())
# Bump when the generator or the layout changes, so cached federations are rebuilt.
# 4: classification sites carry lesion masks; 5: a CT shortcut marker is dense
GENERATOR_VERSION = 5
COMPLETE_MARKER = ".complete"


@dataclass(frozen=True)
class FederationSpec:
    """What ``radfl synth`` generates; a bad value raises ``ConfigError`` naming it."""

    sites: int
    task: str
    dims: int
    seed: int
    samples_per_site: int
    image_size: int
    num_classes: int
    #: Share of the training split's patients whose labels are left blank (unlabelled studies,
    #: for pseudo-labelling); ``HIDDEN_LABELS_SPLIT`` says which rows are training.
    hidden_label_fraction: float = 0.0
    #: The site whose images carry a corner marker going with the label (-1: none).
    shortcut_site: int = -1

    def __post_init__(self) -> None:
        if not 0.0 <= self.hidden_label_fraction < 1.0:
            raise ConfigError(f"--hide-labels must lie in [0, 1), got {self.hidden_label_fraction}")
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.dims not in (2, 3):
            raise ConfigError(f"dims must be 2 or 3, got {self.dims}")
        if self.image_size < 16:
            raise ConfigError(f"image_size must be >= 16, got {self.image_size}")
        if self.num_classes < 2 or self.num_classes > 255:
            raise ConfigError(f"num_classes must be in 2..255, got {self.num_classes}")


FIELD_OF_VIEW_MM = 320.0  # every site images the same field; native matrices differ

# CT: soft tissue (synthetic body level 0.5) at 40 HU, air at -1000 HU. The body's occupancy
# carries the air-to-tissue step so noise and lesions keep one scale everywhere.
BODY_LEVEL = 0.5
SOFT_TISSUE_HU = 40.0
AIR_HU = -1000.0
HU_PER_UNIT = 400.0
CT_RESCALE_INTERCEPT = -1024
CT_MAX_STORED = 4095  # 12 bits stored
MR_UNITS_PER_UNIT = 1000.0
DX_GAIN = 2500.0
DX_SHIFT = 0.5
DX_MAX_STORED = 4095

_FIRST_STUDY_DATE = datetime.date(2019, 1, 7)
_DAYS_BETWEEN_STUDIES = 120


@dataclass(frozen=True)
class SiteFormat:
    """How a site stores its images: the writer, modality and file suffixes."""

    name: str
    modality: str
    image_suffix: str
    mask_suffix: str


def site_format(index: int, dims: int) -> SiteFormat:
    """The storage format of site ``index`` for ``dims``-dimensional images."""
    name = SITE_FORMATS[index % len(SITE_FORMATS)]
    if name == "dicom":
        return SiteFormat(name, "CT", ".dcm" if dims == 2 else "", ".nii.gz")
    if name == "nifti":
        return SiteFormat(name, "MR", ".nii.gz", ".nii.gz")
    if dims == 2:
        return SiteFormat(name, "DX", ".png", ".png")
    return SiteFormat("npy", "OT", ".npy", ".npy")


def write_federation(out: Path, spec: FederationSpec) -> list[Path]:
    """Write ``spec.sites`` synthetic hospitals into ``out/site-<i>``; return their folders.

    Raises ``ConfigError`` when a site folder exists and is not empty.
    """
    profiles = site_profiles(spec.sites, spec.samples_per_site, spec.seed)
    out = Path(out)
    folders = [out / profile.name for profile in profiles]
    for folder in folders:
        if folder.exists() and any(folder.iterdir()):
            raise ConfigError(
                f"{folder} exists and is not empty: remove it or choose another --out"
            )
    for index, (profile, folder) in enumerate(zip(profiles, folders, strict=True)):
        data = make_site(
            profile,
            index=index,
            image_size=native_image_size(profile, spec.image_size),
            spatial_dims=spec.dims,
            num_classes=spec.num_classes,
            seed=spec.seed,
            follow_up_studies=True,
            **task_class(spec.task).synthetic_options(),
        )
        if index == spec.shortcut_site:
            data = plant_shortcut(data, spec.seed)
        hidden = hidden_patients(data.patient_ids, spec.hidden_label_fraction, spec.seed, index)
        _write_site(
            folder,
            data,
            site_format(index, spec.dims),
            task=spec.task,
            seed=spec.seed,
            hidden=hidden,
        )
    return folders


def hidden_patients(patient_ids: list[str], fraction: float, seed: int, index: int) -> set[str]:
    """The patients whose labels a site leaves blank: ``fraction`` of those in the training
    split a site computes with the default run config and ``split-seed`` 0, drawn by seed."""
    if fraction <= 0:
        return set()
    config = from_run_config(ClientConfig, default_run_config())
    validation, test = config.validation_fraction, config.test_fraction
    fractions = SplitFractions(1.0 - validation - test, validation, test)
    splits = assign_splits(patient_ids, seed=0, fractions=fractions)
    training = sorted({p for p, s in zip(patient_ids, splits, strict=True) if s == TRAIN})
    rng = np.random.default_rng([seed, index, 104729])
    chosen = rng.choice(len(training), size=int(round(fraction * len(training))), replace=False)
    return {training[i] for i in chosen}


def ensure_federation(cache_dir: Path, spec: FederationSpec) -> list[Path]:
    """The site folders of this federation under ``cache_dir``, written only if not complete.

    The federation lives in a subfolder named by a hash of the spec. A marker file written last
    says it is complete; a folder without one (an interrupted run) is removed and rewritten.
    """
    fields = asdict(spec)
    if not spec.hidden_label_fraction:  # federations written before the option keep their key
        del fields["hidden_label_fraction"]
    if fields["shortcut_site"] < 0:  # the key of a federation without one stays as it was
        del fields["shortcut_site"]
    key = json.dumps({"generator_version": GENERATOR_VERSION, **fields}, sort_keys=True)
    root = Path(cache_dir) / f"synth-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    marker = root / COMPLETE_MARKER
    if marker.is_file():
        return [root / f"site-{index}" for index in range(spec.sites)]
    if root.exists():
        shutil.rmtree(root)
    folders = write_federation(root, spec)
    marker.write_text(key + "\n")
    return folders


def _write_site(
    folder: Path,
    data: SiteData,
    fmt: SiteFormat,
    *,
    task: str,
    seed: int,
    hidden: set[str] | None = None,
) -> None:
    """Write one site's files and its manifest (written last); the rows of ``hidden``
    patients get blank labels (``label``, and ``labels`` with findings)."""
    for sub in ("images", "masks", "instances"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    profile = data.profile
    spacing_mm = FIELD_OF_VIEW_MM / data.images.shape[-1]
    masks = _numpy(data.masks, "masks")
    instances = _numpy(data.instances, "instances")
    label_columns = task_class(task).required_columns
    rows = []
    for i, study in enumerate(data.study_ids):
        image_path = f"images/{study}{fmt.image_suffix}"
        if fmt.name == "dicom":
            _write_dicom(
                folder / image_path, stored_values(data, i, fmt), data, i, spacing_mm, seed
            )
        else:
            _write_array(folder / image_path, stored_values(data, i, fmt), fmt, spacing_mm)
        row: dict[str, object] = {
            manifest.IMAGE: image_path,
            manifest.PATIENT_ID: data.patient_ids[i],
            manifest.STUDY_ID: study,
            manifest.LABEL: int(data.labels[i]),
        }
        if data.findings is not None:
            row[manifest.LABELS] = ";".join(str(int(v)) for v in data.findings[i])
        if hidden and data.patient_ids[i] in hidden:
            row[manifest.LABEL] = ""
            if data.findings is not None:
                row[manifest.LABELS] = ""
        if manifest.MASK in label_columns or task_class(task).lesion_masks:
            mask_path = f"masks/{study}{fmt.mask_suffix}"
            _write_mask(folder / mask_path, masks[i], fmt, spacing_mm)
            row[manifest.MASK] = mask_path
        if manifest.BOXES in label_columns:
            row[manifest.BOXES] = json.dumps(data.boxes[i], separators=(",", ":"))
        if manifest.INSTANCE_MASK in label_columns:
            instance_path = f"instances/{study}{fmt.mask_suffix}"
            _write_mask(folder / instance_path, instances[i], fmt, spacing_mm)
            row[manifest.INSTANCE_MASK] = instance_path
        row[manifest.SEX] = data.sex[i]
        row[manifest.AGE] = data.age[i]
        row[manifest.MANUFACTURER] = profile.manufacturer
        row[manifest.MODALITY] = fmt.modality
        rows.append(row)
    for sub in ("masks", "instances"):
        if not any((folder / sub).iterdir()):
            (folder / sub).rmdir()
    with (folder / manifest.MANIFEST_NAME).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _numpy(values: torch.Tensor | None, name: str) -> np.ndarray:
    """``(N, *spatial)`` array of a per-image tensor ``(N, 1, *spatial)``."""
    if values is None:
        raise ConfigError(f"site data has no {name}: build it with common.synthetic.make_site")
    return values[:, 0].numpy()


def stored_values(data: SiteData, index: int, fmt: SiteFormat) -> np.ndarray:
    """Image ``index`` of ``data`` in the units and dtype ``fmt`` stores (axis 0 = x)."""
    values = data.images[index, 0].numpy().astype(np.float64)
    if fmt.name == "dicom":
        body = _numpy(data.body, "body")[index]
        stored = _hounsfield(values, body, data.profile) - CT_RESCALE_INTERCEPT
        return np.clip(np.round(stored), 0, CT_MAX_STORED).astype(np.uint16)
    if fmt.name == "nifti":
        # Magnitude images: positive, with a noise floor in air.
        return (MR_UNITS_PER_UNIT * np.abs(values)).astype(np.float32)
    stored = np.round((values + DX_SHIFT) * DX_GAIN)
    return np.clip(stored, 0, DX_MAX_STORED).astype(np.uint16)


def _hounsfield(values: np.ndarray, body: np.ndarray, profile: SiteProfile) -> np.ndarray:
    """CT numbers: a CT scanner is calibrated, so the site's gain and offset are undone."""
    units = (values - profile.intensity_offset) / profile.intensity_scale
    step = SOFT_TISSUE_HU - AIR_HU - HU_PER_UNIT * BODY_LEVEL
    return AIR_HU + step * (body / 255.0) + HU_PER_UNIT * units


def _voxel_origin_mm(spacing_mm: float) -> float:
    """Centre of the first voxel along each axis, for a grid centred on the origin."""
    return -FIELD_OF_VIEW_MM / 2 + spacing_mm / 2


def _nifti_affine(dims: int, spacing_mm: float, *, dicom_geometry: bool) -> np.ndarray:
    """RAS affine of the grid. With ``dicom_geometry``, the one MONAI derives from our DICOM.

    The DICOM writer puts axis 0 along patient x (LPS +x, right to left) and axis 1 along
    patient y (LPS +y, anterior to posterior); in RAS both change sign.
    """
    origin = _voxel_origin_mm(spacing_mm)
    sign = -1.0 if dicom_geometry else 1.0
    affine = np.diag([sign * spacing_mm, sign * spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = [sign * origin, sign * origin, origin if dims == 3 else 0.0]
    return affine


def _write_array(path: Path, values: np.ndarray, fmt: SiteFormat, spacing_mm: float) -> None:
    """A NIfTI, PNG or NumPy image (axis 0 = x)."""
    dims = values.ndim
    if fmt.name == "nifti":
        _save_nifti(path, values, _nifti_affine(dims, spacing_mm, dicom_geometry=False))
    elif fmt.name == "png":
        Image.fromarray(np.ascontiguousarray(values.T)).save(path)
    else:
        np.save(path, values)


def _write_mask(path: Path, values: np.ndarray, fmt: SiteFormat, spacing_mm: float) -> None:
    """A uint8 mask on the image's grid, in the format's mask type (axis 0 = x)."""
    if fmt.mask_suffix == ".nii.gz":
        affine = _nifti_affine(values.ndim, spacing_mm, dicom_geometry=fmt.name == "dicom")
        _save_nifti(path, values, affine)
    elif fmt.mask_suffix == ".png":
        Image.fromarray(np.ascontiguousarray(values.T)).save(path)
    else:
        np.save(path, values)


def _save_nifti(path: Path, values: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(values, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def _write_dicom(
    path: Path, stored: np.ndarray, data: SiteData, index: int, spacing_mm: float, seed: int
) -> None:
    """One CT image (2D) or a series folder of one file per slice (3D)."""
    profile = data.profile
    study = data.study_ids[index]
    patient = data.patient_ids[index]
    visit = data.visits[index]
    patient_number = int(patient.rsplit("-p", 1)[1])

    def uid(*parts: object) -> UID:
        return generate_uid(entropy_srcs=[str(seed), profile.name, study, *map(str, parts)])

    date = _FIRST_STUDY_DATE + datetime.timedelta(
        days=(patient_number * 37) % 700 + _DAYS_BETWEEN_STUDIES * visit
    )
    volume = stored if stored.ndim == 3 else stored[..., None]
    origin = _voxel_origin_mm(spacing_mm)
    if stored.ndim == 3:
        path.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
    ds.AccessionNumber = f"A{patient_number:06d}{visit}"
    ds.Modality = "CT"
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = f"RadFL synthetic hospital {profile.name}"
    ds.StudyDescription = "CT ABDOMEN (synthetic)"
    ds.SeriesDescription = "AXIAL"
    ds.PatientName = f"SYNTHETIC^{patient_number:05d}"
    ds.PatientID = patient
    ds.PatientSex = data.sex[index]
    ds.PatientAge = f"{data.age[index]:03d}Y"
    ds.BodyPartExamined = "ABDOMEN"
    ds.SliceThickness = _ds(spacing_mm)
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.StudyID = f"{visit + 1}"
    ds.SeriesNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = uid("frame")
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
    ds.PixelSpacing = [_ds(spacing_mm), _ds(spacing_mm)]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = str(CT_RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    # One dataset for the series: only the per-slice attributes change between files.
    for k in range(volume.shape[2]):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid("instance", k)
        ds.InstanceNumber = k + 1
        z = origin + k * spacing_mm if stored.ndim == 3 else 0.0
        ds.ImagePositionPatient = [_ds(origin), _ds(origin), _ds(z)]
        ds.SliceLocation = _ds(z)
        # Rows run along y: the pixel matrix is the transposed (x, y) slice.
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T).tobytes()
        target = path / f"slice-{k:04d}.dcm" if stored.ndim == 3 else path
        ds.save_as(target, enforce_file_format=True)


def _ds(value: float) -> str:
    """A decimal string short enough for DICOM's 16-character DS."""
    return f"{value:.10g}"
