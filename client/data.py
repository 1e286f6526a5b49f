"""A real site's images: the manifest, MONAI readers and preprocessing, and a cached dataset.

A site folder holds ``manifest.csv`` (schema in ``common.manifest``) and the images it names.
Every message about a manifest row names it by its **CSV line number**: the header is line 1 and
the first data row line 2, as a text editor shows it (a blank line or a quoted value spanning
lines is counted as the file has it). Tables returned here are indexed by that line number.

Images are read with MONAI's readers (``LoadImage``): DICOM files and folders holding one DICOM
series with ``PydicomReader`` (rescale slope and intercept applied, so CT is in HU), NIfTI with
``NibabelReader``, PNG and JPEG with ``PILReader`` and ``.npy`` with ``NumpyReader``. The
preprocessing is deterministic, so its result is stored once per image in a site-local
``PersistentDataset`` folder and later epochs, rounds and processes read the stored tensor
instead of decoding again. Random augmentation is added by the trainer on top.

Preprocessing (``image_transforms``), in order:

1. read, channel first: a 2D DICOM ``(H, W)`` becomes ``(1, H, W)``; a greyscale image stored as
   RGB(A) becomes one channel (the mean of its colour channels, which the site check has found
   equal; true colour images are refused by the check, the networks take one grey channel);
2. 3D only: reorient to RAS (``Orientationd``) from the affine the reader found (identity for
   ``.npy``), and resample to ``spacing_mm`` when one is given (``Spacingd``). The default is no
   resampling: every volume is then resized to the same grid, which keeps its whole field of
   view whatever its voxel size, so resampling first would only add an interpolation. 2D images
   (radiographs, single DICOM slices, PNG) keep their stored orientation and are not resampled:
   projection images have no patient-space affine worth applying, and PNGs have none at all;
3. intensity by modality: CT is windowed in HU (``ct_window_hu = (level, width)``, default
   soft tissue 40/400), clipped and scaled to [0, 1]; every other modality (MR, NIfTI without a
   modality, X-ray CR/DX, US, OT, PNG/JPEG) is scaled from its 0.5th-99.5th percentile to [0, 1]
   and clipped;
4. resize to ``(image_size,) * spatial_dims`` (bilinear or trilinear, anti-aliased);
5. a plain ``float32`` tensor (no MONAI metadata).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import monai
import numpy as np
import pandas as pd
import pydicom
import torch
from monai import transforms as mt
from monai.apps.detection.transforms import dictionary as mdt
from monai.data import PersistentDataset
from pydicom.errors import InvalidDicomError
from torch.utils.data import Dataset

from common import manifest as mf
from common.errors import RadFLError
from common.tasks import Task, list_tasks, task_class

log = logging.getLogger(__name__)
# MONAI warns on every PydicomReader that its optional GPU decoder plugin (nvImageCodec) is
# missing; decoding on the CPU is the normal path for a site, so that warning is only noise.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)

CACHE_FOLDER = ".radfl-cache"
"""The site-local cache folder under the site root (preprocessed images, check results)."""

DEFAULT_CT_WINDOW_HU = (40.0, 400.0)
"""CT window (level, width) in Hounsfield units: soft tissue."""

PERCENTILES = (0.5, 99.5)
"""Intensity percentiles mapped to 0 and 1 for every modality except CT."""

SUPPORTED_MODALITIES = ("CT", "MR", "CR", "DX", "US", "OT")
"""Modalities the loader normalises (``common.manifest``); SR, PR, SEG, RT... are refused."""

# Bump when the preprocessing changes in a way the settings below do not capture: it renames the
# cache folder, so stale tensors are never read.
_PREPROCESS_VERSION = 1


class SiteDataError(RadFLError, ValueError):
    """A site's manifest or images cannot be used; the message names the file (and CSV line).

    Only ``code``, ``category`` and the number of ``problems`` leave the site
    (``common.errors.public_message``): the message names files and patients.
    """

    code = "E-DATA"
    category = "site data check failed"

    def __init__(self, message: str, *, problems: int | None = None) -> None:
        super().__init__(message)
        self.problems = problems

    def public_detail(self) -> str:
        if self.problems is None:
            return ""
        return f"{self.problems} problem{'' if self.problems == 1 else 's'}"


# --------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------


def read_manifest(root: Path, task: str) -> pd.DataFrame:
    """The site manifest ``ROOT/manifest.csv`` as a table of stripped strings.

    Empty cells are empty strings. The index is the CSV line number of each row (header = line 1)
    and is named ``line``; blank lines are skipped.

    Raises
    ------
    SiteDataError
        If the file is missing or unreadable, a row has more cells than the header, the task is
        unknown, or a column the task needs is missing (the message names the file and columns).
    """
    root = Path(root)
    path = root / mf.MANIFEST_NAME
    columns = (*mf.REQUIRED_COLUMNS, *site_task(task).required_columns)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise SiteDataError(f"{path}: site manifest not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SiteDataError(f"{path}: cannot read the site manifest: {exc}") from exc

    reader = csv.reader(text.splitlines(keepends=True))
    header: list[str] | None = None
    records: list[list[str]] = []
    lines: list[int] = []
    start = 1
    try:
        for record in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in record):
                continue
            if header is None:
                header = [cell.strip() for cell in record]
                continue
            if len(record) > len(header):
                raise SiteDataError(
                    f"{path}: line {line} has {len(record)} cells but the header has {len(header)}"
                )
            records.append([c.strip() for c in record] + [""] * (len(header) - len(record)))
            lines.append(line)
    except csv.Error as exc:
        raise SiteDataError(f"{path}: line {reader.line_num}: not valid CSV: {exc}") from exc
    if header is None:
        raise SiteDataError(f"{path}: the manifest is empty (no header line)")
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if duplicated:
        raise SiteDataError(f"{path}: duplicated column(s): {', '.join(duplicated)}")
    missing = [c for c in columns if c not in header]
    if missing:
        raise SiteDataError(
            f"{path}: missing column(s) {', '.join(missing)} (task {task} needs "
            f"{', '.join(columns)})"
        )
    table = pd.DataFrame(records, columns=header, index=pd.Index(lines, name="line"), dtype=str)
    return table


def resolve_path(root: Path, relative: str) -> Path:
    """``root / relative``; a path that leaves the site folder raises ``SiteDataError``."""
    root = Path(root).resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise SiteDataError(f"{relative}: the path leaves the site folder {root}")
    return path


# --------------------------------------------------------------------------------------------
# Subgroup attributes from DICOM headers
# --------------------------------------------------------------------------------------------


def is_dicom_path(path: Path) -> bool:
    """Whether the loader reads ``path`` as DICOM: a ``.dcm`` file or a folder (a series)."""
    return path.is_dir() or path.name.lower().endswith(".dcm")


def series_files(folder: Path) -> list[Path]:
    """The files of a DICOM series folder that carry the DICOM marker, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and pydicom.misc.is_dicom(p))


def parse_dicom_age(value: str) -> str:
    """A DICOM Age String (``063Y``, ``006M``, ``010W``, ``003D``) in whole years, or ``""``."""
    value = str(value).strip().upper()
    units = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}
    if len(value) >= 2 and value[-1] in units and value[:-1].isdigit():
        return str(int(int(value[:-1]) / units[value[-1]]))
    return ""


def subgroups_from_header(dataset: pydicom.Dataset) -> dict[str, str]:
    """Subgroup values (``common.manifest.DICOM_SUBGROUP_TAGS``) a DICOM header carries."""
    values: dict[str, str] = {}
    for column, keyword in mf.DICOM_SUBGROUP_TAGS.items():
        raw = dataset.get(keyword)
        text = "" if raw is None else str(raw).strip()
        if column == mf.AGE:
            text = parse_dicom_age(text)
        elif column in (mf.SEX, mf.MODALITY):
            text = text.upper()
        if text:
            values[column] = text
    return values


def read_dicom_header(path: Path) -> pydicom.Dataset:
    """The header of a DICOM file, or of the first file of a series folder (no pixel data)."""
    if path.is_dir():
        files = series_files(path)
        if not files:
            raise SiteDataError(f"{path}: the folder holds no DICOM file")
        path = files[0]
    return pydicom.dcmread(path, stop_before_pixels=True)


def fill_subgroups_from_dicom(table: pd.DataFrame, root: Path) -> pd.DataFrame:
    """A copy of ``table`` whose empty sex, age, manufacturer and modality come from DICOM tags.

    Only DICOM rows (``.dcm`` files and series folders) are read, header only
    (``stop_before_pixels``). Missing subgroup columns are added. A row whose header cannot be
    read keeps its empty values: the site check reports that file as unreadable.
    """
    table = table.copy()
    for column in mf.SUBGROUP_COLUMNS:
        if column not in table.columns:
            table[column] = ""
    columns = list(mf.DICOM_SUBGROUP_TAGS)
    for line, row in table.iterrows():
        if all(row[c] for c in columns) or not row[mf.IMAGE]:
            continue
        try:
            path = resolve_path(root, row[mf.IMAGE])
            if not is_dicom_path(path) or not path.exists():
                continue
            values = subgroups_from_header(read_dicom_header(path))
        except (InvalidDicomError, OSError, SiteDataError, ValueError, EOFError) as exc:
            log.debug("line %s: no DICOM subgroup values from %s: %s", line, row[mf.IMAGE], exc)
            continue
        for column in columns:
            if not row[column] and column in values:
                table.at[line, column] = values[column]
    return table


# --------------------------------------------------------------------------------------------
# Reading and preprocessing
# --------------------------------------------------------------------------------------------


def _load_image(keys: list[str] | None = None) -> mt.Transform:
    """MONAI's ``LoadImage`` (or ``LoadImaged`` on ``keys``) with PydicomReader tried first.

    PydicomReader then reads DICOM files and series folders; other suffixes fall through to
    MONAI's NibabelReader, PILReader and NumpyReader.
    """
    with warnings.catch_warnings():
        # LoadImage also builds MONAI's GPU DICOM reader, which warns where nvImageCodec is absent.
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
        if keys is None:
            return mt.LoadImage(reader="PydicomReader", image_only=True)
        return mt.LoadImaged(keys, reader="PydicomReader", image_only=True)


@functools.cache
def _decoder() -> mt.Compose:
    return mt.Compose([_load_image(), mt.EnsureChannelFirst()])


def decode_image(path: Path) -> torch.Tensor:
    """Decode one image's pixel data, channel first, with the loader's readers (MetaTensor)."""
    return _decoder()(str(path))  # type: ignore[no-any-return]


def normalisation_for(modality: str) -> str:
    """``"ct-window"`` for CT, ``"percentile"`` for every other (or unknown) modality."""
    return "ct-window" if str(modality).strip().upper() == "CT" else "percentile"


class OneChannel(mt.MapTransform):
    """Keep one channel: greyscale stored as RGB(A) becomes the mean of its colour channels.

    Anything else with more than one channel raises ``SiteDataError``; the site check reports such
    images before training.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            channels = image.shape[0]
            if channels in (3, 4) and image.ndim == 3:
                d[key] = image[:3].mean(dim=0, keepdim=True)
            elif channels != 1:
                source = getattr(image, "meta", {}).get("filename_or_obj", key)
                raise SiteDataError(f"{source}: {channels} channels; the networks take one")
        return d


def image_transforms(
    spatial_dims: int,
    image_size: int,
    modality: str | None,
    *,
    ct_window_hu: tuple[float, float] = DEFAULT_CT_WINDOW_HU,
    spacing_mm: Sequence[float] | None = None,
    with_mask: bool = False,
    with_boxes: bool = False,
    instances: bool = False,
) -> mt.Compose:
    """The deterministic preprocessing of one modality: read, orient, normalise, resize.

    Applies to a dictionary whose ``"image"`` is a path. See the module docstring for each step.
    With ``with_mask``, ``"mask"`` (a label map on the image's grid) is read, oriented and
    resized with it, by nearest neighbour, and never normalised. With ``with_boxes``,
    ``"boxes"`` (``(k, 2 * dims)`` corners in the loaded array's voxel indices) and
    ``"box_labels"`` follow the image through orientation and resizing: MONAI draws each box as
    a mask on the image's grid, the masks are transformed as the image, and boxes are read
    back from them (``BoxToMaskd``, ``MaskToBoxd``). With ``instances`` the mask numbers
    instances, and an instance that nearest-neighbour resizing would lose keeps the voxel at
    its centre.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    image_size
        Edge length in pixels of the network input; every image is resized to
        ``(image_size,) * spatial_dims``.
    modality
        DICOM modality (``CT``, ``MR``, ``CR``...); ``None`` or ``""`` when unknown (NIfTI
        without a modality is treated as MR, PNG/JPEG as X-ray: both are percentile-scaled).
    ct_window_hu
        ``(level, width)`` of the CT window in HU.
    spacing_mm
        Voxel spacing to resample 3D volumes to before resizing; ``None`` (default) keeps the
        native grid.
    """
    if spatial_dims not in (2, 3):
        raise SiteDataError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if image_size < 1:
        raise SiteDataError(f"image_size must be positive, got {image_size}")
    keys = ["image"]
    both = ["image", "mask"] if with_mask else keys
    steps: list[Any] = [
        _load_image(both),
        mt.EnsureChannelFirstd(both),
        OneChannel(both),
    ]
    masks = both[1:]
    if with_boxes:
        steps += [
            mt.Lambda(functools.partial(_box_arrays, spatial_dims=spatial_dims)),
            mdt.BoxToMaskd(
                box_keys="boxes",
                box_mask_keys=BOX_MASK,
                label_keys="box_labels",
                box_ref_image_keys="image",
                min_fg_label=0,
            ),
            mt.Lambda(_box_mask_on_image_grid),
        ]
        masks.append(BOX_MASK)
    spatial = ["image", *masks]
    if spatial_dims == 3:
        steps.append(mt.Orientationd(spatial, axcodes="RAS", labels=None))
        if spacing_mm is not None:
            modes = ("bilinear", *["nearest"] * len(masks))
            steps.append(mt.Spacingd(spatial, pixdim=tuple(spacing_mm), mode=modes))
    if with_boxes:
        # Boxes leave their masks on the oriented grid and are scaled to the training size
        # exactly, so resizing never makes a thin box vanish.
        steps += [
            mdt.MaskToBoxd(
                box_keys="boxes", box_mask_keys=BOX_MASK, label_keys="box_labels", min_fg_label=0
            ),
            mt.DeleteItemsd(BOX_MASK),
            mt.Lambda(functools.partial(_scale_boxes, size=image_size)),
            mt.EnsureTyped("boxes", dtype=torch.float32, track_meta=False),
            mt.EnsureTyped("box_labels", dtype=torch.int64, track_meta=False),
        ]
        masks.remove(BOX_MASK)
    if with_mask:
        steps.append(mt.Lambda(_count_instances))
    if normalisation_for(modality or "") == "ct-window":
        level, width = ct_window_hu
        if width <= 0:
            raise SiteDataError(f"ct_window_hu width must be positive, got {width}")
        steps.append(
            mt.ScaleIntensityRanged(
                keys,
                a_min=level - width / 2,
                a_max=level + width / 2,
                b_min=0.0,
                b_max=1.0,
                clip=True,
            )
        )
    else:
        steps.append(
            mt.ScaleIntensityRangePercentilesd(
                keys, lower=PERCENTILES[0], upper=PERCENTILES[1], b_min=0.0, b_max=1.0, clip=True
            )
        )
    steps += [
        mt.Resized(
            keys,
            spatial_size=(image_size,) * spatial_dims,
            mode="bilinear" if spatial_dims == 2 else "trilinear",
            anti_aliasing=True,
        ),
        mt.EnsureTyped(keys, dtype=torch.float32, track_meta=False),
    ]
    if instances:
        steps.append(mt.Lambda(functools.partial(_resize_instances, size=image_size)))
    elif masks:
        steps.append(mt.Resized(masks, spatial_size=(image_size,) * spatial_dims, mode="nearest"))
    if with_mask:
        steps.append(mt.EnsureTyped("mask", dtype=torch.int64, track_meta=False))
    return mt.Compose(steps)


#: The key of the per-box masks that carry boxes through the image's spatial transforms.
BOX_MASK = "box_mask"


def _box_arrays(data: dict[str, Any], spatial_dims: int) -> dict[str, Any]:
    """Boxes and their labels as arrays (the cached item holds JSON-friendly lists)."""
    data["boxes"] = np.asarray(data["boxes"], dtype=np.float64).reshape(-1, 2 * spatial_dims)
    data["box_labels"] = np.asarray(data["box_labels"], dtype=np.int64).reshape(-1)
    return data


def _scale_boxes(data: dict[str, Any], size: int) -> dict[str, Any]:
    """Boxes on the image's current grid scaled to ``size`` voxels per axis (the resize)."""
    shape = torch.as_tensor(data["image"].shape[1:], dtype=torch.float64)
    factor = (size / shape).repeat(2)
    data["boxes"] = torch.as_tensor(data["boxes"], dtype=torch.float64) * factor
    return data


def _resize_instances(data: dict[str, Any], size: int) -> dict[str, Any]:
    """Nearest-neighbour resizing of an instance map that keeps every instance: one that
    would vanish (smaller than a voxel at ``size``) keeps the voxel at its centre."""
    mask = torch.as_tensor(data["mask"])
    shape = torch.tensor(mask.shape[1:], dtype=torch.float64)
    resized = torch.as_tensor(mt.Resize((size,) * (mask.dim() - 1), mode="nearest")(mask))
    for value in set(torch.unique(mask).tolist()) - set(torch.unique(resized).tolist()):
        centre = torch.nonzero(mask[0] == value).double().mean(0)
        voxel = ((centre + 0.5) * size / shape).floor().long().clamp(0, size - 1)
        if resized[(0, *voxel.tolist())] == 0:
            resized[(0, *voxel.tolist())] = value
    data["mask"] = resized
    return data


def _count_instances(data: dict[str, Any]) -> dict[str, Any]:
    """The number of distinct non-zero mask values before resizing (``mask_values``), so
    the loader can tell when resizing drops a small instance."""
    data["mask_values"] = int((torch.unique(torch.as_tensor(data["mask"])) > 0).sum())
    return data


def _box_mask_on_image_grid(data: dict[str, Any]) -> dict[str, Any]:
    """Give the box masks the image's affine, so orientation moves them as the image."""
    image = data["image"]
    affine = image.affine if isinstance(image, monai.data.MetaTensor) else None
    data[BOX_MASK] = monai.data.MetaTensor(torch.as_tensor(data[BOX_MASK]), affine=affine)
    return data


def preprocessing_key(
    spatial_dims: int,
    image_size: int,
    ct_window_hu: tuple[float, float] = DEFAULT_CT_WINDOW_HU,
    spacing_mm: Sequence[float] | None = None,
) -> str:
    """A short hash of every preprocessing setting: the name of the cache folder they fill."""
    settings = {
        "version": _PREPROCESS_VERSION,
        "monai": monai.__version__,
        "spatial_dims": spatial_dims,
        "image_size": image_size,
        "ct_window_hu": list(ct_window_hu),
        "spacing_mm": None if spacing_mm is None else list(spacing_mm),
        "percentiles": list(PERCENTILES),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def file_stamp(path: Path) -> str:
    """Size, modification time, inode and status-change time of a file, or of every file in a
    folder: a cache key part of the preprocessing cache and the stored site check.

    An image rewritten in place or replaced gets a new stamp, so its stale cached tensor and
    check are never used. Size and modification time alone can be kept by a replacement (a
    copy with ``cp -p``, ``touch -r``, ``os.utime``); the inode changes when a file is replaced,
    and the status-change time whenever its content or times are set, which no user call can
    set back.
    """
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        parts = [f"{p.name}:{_stamp(p.stat())}" for p in files]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return _stamp(path.stat())


def _stamp(stat: os.stat_result) -> str:
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}:{stat.st_ctime_ns}"


class _ByModality(mt.MapTransform):
    """Runs the preprocessing of the item's modality and counts the decodes it performs."""

    def __init__(self, pipelines: dict[str, mt.Compose]) -> None:
        super().__init__(keys=["image"])
        self.pipelines = pipelines
        self.calls = 0

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.calls += 1
        return self.pipelines[data["normalisation"]](dict(data))  # type: ignore[no-any-return]


class SiteDataset(Dataset[dict[str, Any]]):
    """One split of a site's manifest rows, preprocessed once and cached on disk.

    Items are ``{"image": float32 (1, *spatial), "label": ...}``, the label as the task's
    ``site_target`` builds it from the row's class, its preprocessed mask (the task's
    ``mask_column``) or its boxes (``box_column``). ``labels`` holds every row's image-level
    class without decoding (class weights, balanced sampling): the ``label`` column when
    present (blank: 0, unless the label is the task's target), else the boxes' largest kind,
    else 0.

    The preprocessed tensor of each row is stored by MONAI's ``PersistentDataset`` under
    ``cache_dir / <preprocessing_key(...)>``; ``cache_dir`` defaults to ``ROOT/.radfl-cache``.
    An item's cache key is its absolute path, its file stamp (size, modification time, inode,
    status-change time: ``file_stamp``) and its normalisation, so a changed image is decoded
    again. ``decode_count`` counts the decodes this process performed (DataLoader workers count
    in their own copies).

    Parameters
    ----------
    rows
        Manifest rows (``read_manifest``, indexed by CSV line) of one split, ideally passed
        through ``fill_subgroups_from_dicom`` so the modality is known, and checked.
    root
        The site folder.
    task
        The task (or its registered name) whose targets the rows hold.
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        root: Path,
        *,
        task: str | type[Task],
        spatial_dims: int,
        image_size: int,
        cache_dir: Path | None = None,
        ct_window_hu: tuple[float, float] = DEFAULT_CT_WINDOW_HU,
        spacing_mm: Sequence[float] | None = None,
    ) -> None:
        self.task = site_task(task, "has no site loader") if isinstance(task, str) else task
        self.spatial_dims = spatial_dims
        self.root = Path(root)
        self.lines = [int(line) for line in rows.index]
        self.files = [str(v) for v in rows[mf.IMAGE]]
        self.mask_column = self.task.mask_column
        box_column = self.task.box_column
        self.with_boxes = box_column is not None
        self.boxes = []
        if box_column is not None:
            column = rows[box_column] if box_column in rows.columns else [""] * len(rows)
            for line, value in zip(self.lines, column, strict=True):
                self.boxes.append(_parse_boxes(value, line, spatial_dims))
        if mf.LABEL in rows.columns and self.task.label_is_target:
            label_values = list(rows[mf.LABEL])
        elif mf.LABEL in rows.columns:
            label_values = [v if str(v).strip() else 0 for v in rows[mf.LABEL]]
        elif self.boxes:
            # The image's class: its boxes' largest kind, 0 without boxes (balanced sampling).
            label_values = [int(b[:, -1].max()) if len(b) else 0 for b in self.boxes]
        else:
            label_values = [0] * len(rows)
        labels = [_parse_label(v, line) for line, v in zip(self.lines, label_values, strict=True)]
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.attributes = attribute_table(rows)
        modalities = rows[mf.MODALITY] if mf.MODALITY in rows.columns else [""] * len(rows)
        items: list[dict[str, Any]] = []
        for line, file, modality in zip(self.lines, self.files, modalities, strict=True):
            path = resolve_path(self.root, file)
            try:
                stamp = file_stamp(path)
            except OSError as exc:
                raise SiteDataError(f"line {line}: {file}: {exc.strerror or exc}") from exc
            item = {
                "image": str(path),
                "stamp": stamp,
                "normalisation": normalisation_for(str(modality)),
            }
            if self.mask_column:
                mask = resolve_path(self.root, str(rows.at[line, self.mask_column]))
                try:
                    item["mask_stamp"] = file_stamp(mask)
                except OSError as exc:
                    raise SiteDataError(f"line {line}: {mask}: {exc.strerror or exc}") from exc
                item["mask"] = str(mask)
            if self.with_boxes:
                boxes = self.boxes[len(items)]
                item["boxes"] = boxes[:, :-1].tolist()
                # Object classes from 0: a box of lesion kind k is class k - 1.
                item["box_labels"] = np.maximum(boxes[:, -1] - 1, 0).astype(int).tolist()
            items.append(item)
        pipelines = {
            kind: image_transforms(
                spatial_dims,
                image_size,
                "CT" if kind == "ct-window" else None,
                ct_window_hu=ct_window_hu,
                spacing_mm=spacing_mm,
                with_mask=self.mask_column is not None,
                with_boxes=self.with_boxes,
                instances=self.task.numbered_instances,
            )
            for kind in ("ct-window", "percentile")
        }
        self._preprocess = _ByModality(pipelines)
        key = preprocessing_key(spatial_dims, image_size, ct_window_hu, spacing_mm)
        self.cache_dir = Path(cache_dir or self.root / CACHE_FOLDER) / f"preprocessed-{key}"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._cached = PersistentDataset(
            items, transform=mt.Compose([self._preprocess]), cache_dir=self.cache_dir
        )

    @property
    def decode_count(self) -> int:
        """Images decoded (cache misses) by this process since the dataset was built."""
        return self._preprocess.calls

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            item = self._cached[index]
        except Exception as exc:
            # Name the row and file; the original traceback stays attached.
            cause = transform_error_cause(exc)
            raise SiteDataError(
                f"line {self.lines[index]}: {self.files[index]}: {type(cause).__name__}: {cause}"
            ) from cause
        image = torch.as_tensor(item["image"], dtype=torch.float32)
        boxes = self.boxes[index] if self.with_boxes else None
        try:
            target = self.task.site_target(item, self.labels[index], boxes)
        except ValueError as exc:
            raise SiteDataError(f"line {self.lines[index]}: {self.files[index]}: {exc}") from exc
        return {"image": image, "label": target}


def attribute_table(rows: pd.DataFrame) -> pd.DataFrame:
    """``patient_id`` and every subgroup column of manifest rows (any column that is not an
    image, label or identifier), aligned with the rows, for the bias report."""
    structural = {mf.IMAGE, mf.STUDY_ID, mf.LABEL, *mf.PATH_COLUMNS, mf.BOXES}
    columns = [mf.PATIENT_ID] + [c for c in rows.columns if c not in structural | {mf.PATIENT_ID}]
    return rows[columns].reset_index(drop=True)


def transform_error_cause(exc: BaseException) -> BaseException:
    """The error a MONAI transform raised, without MONAI's ``applying transform`` wrappers."""
    while (
        isinstance(exc, RuntimeError)
        and str(exc).startswith("applying transform")
        and exc.__cause__ is not None
    ):
        exc = exc.__cause__
    return exc


def site_task(name: str, unknown: str = "") -> type[Task]:
    """The registered task ``name``; an unknown one raises ``SiteDataError`` naming the known
    ones (``task NAME <unknown>; known: ...`` when ``unknown`` says what went wrong)."""
    try:
        return task_class(name)
    except RadFLError as exc:
        if unknown:
            raise SiteDataError(
                f"task {name!r} {unknown}; known: {', '.join(list_tasks())}"
            ) from None
        raise SiteDataError(str(exc)) from None


def _parse_boxes(value: Any, line: int, spatial_dims: int) -> np.ndarray:
    """A row's ``boxes`` JSON as ``(k, 2 * dims + 1)``: corners, then the lesion kind."""
    text = str(value).strip() if value is not None else ""
    if not text or text.lower() == "nan":
        text = "[]"
    width = 2 * spatial_dims + 1
    try:
        boxes = np.asarray(json.loads(text), dtype=np.float64)
    except (json.JSONDecodeError, ValueError, TypeError) as exc:
        raise SiteDataError(f"line {line}: boxes are not a JSON list of boxes: {exc}") from exc
    if boxes.size == 0:
        return np.zeros((0, width))
    if boxes.ndim != 2 or boxes.shape[1] != width or not np.isfinite(boxes).all():
        raise SiteDataError(
            f"line {line}: boxes must be lists of {width} numbers ({spatial_dims}D corners and "
            "the lesion kind)"
        )
    if (boxes[:, spatial_dims:-1] <= boxes[:, :spatial_dims]).any():
        raise SiteDataError(f"line {line}: a box is empty or inverted")
    return boxes


def _parse_label(value: Any, line: int) -> int:
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not np.isfinite(number) or number != int(number):
        raise SiteDataError(f"line {line}: label {text!r} is not an integer class")
    return int(number)
