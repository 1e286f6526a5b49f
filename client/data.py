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

The preprocessing steps, in order, are in ``client.preprocessing`` (re-exported here).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import torch
from monai import transforms as mt
from monai.data import PersistentDataset
from pydicom.errors import InvalidDicomError
from torch.utils.data import Dataset

from client.preprocessing import (
    BOX_MASK,
    DEFAULT_CT_WINDOW_HU,
    PERCENTILES,
    OneChannel,
    _ByModality,
    decode_image,
    image_transforms,
    normalisation_for,
    preprocessing_key,
)
from common import manifest as mf
from common.errors import RadFLError, SiteDataError
from common.tasks import Task, list_tasks, task_class

log = logging.getLogger(__name__)

__all__ = [
    "BOX_MASK",
    "CACHE_FOLDER",
    "DEFAULT_CT_WINDOW_HU",
    "PERCENTILES",
    "SUPPORTED_MODALITIES",
    "OneChannel",
    "SiteDataError",
    "SiteDataset",
    "_ByModality",
    "attribute_table",
    "decode_image",
    "fill_subgroups_from_dicom",
    "file_stamp",
    "image_transforms",
    "normalisation_for",
    "preprocessing_key",
    "read_manifest",
    "resolve_path",
    "site_task",
    "transform_error_cause",
]
# MONAI warns on every PydicomReader that its optional GPU decoder plugin (nvImageCodec) is
# missing; decoding on the CPU is the normal path for a site, so that warning is only noise.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)

CACHE_FOLDER = ".radfl-cache"
"""The site-local cache folder under the site root (preprocessed images, check results)."""

SUPPORTED_MODALITIES = ("CT", "MR", "CR", "DX", "US", "OT")
"""Modalities the loader normalises (``common.manifest``); SR, PR, SEG, RT... are refused."""

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
    num_classes
        Checked against each target (``Task.parse_label``); ``None``: not checked (the site
        check did), but a multi-label row's flags are still read.
    unlabelled
        The rows are unlabelled studies (blank targets, pseudo-labelling): ``labels`` are 0
        and only the images are read.
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
        num_classes: int | None = None,
        unlabelled: bool = False,
    ) -> None:
        self.task = site_task(task, "has no site loader") if isinstance(task, str) else task
        self.spatial_dims = spatial_dims
        self.root = Path(root)
        self.lines = [int(line) for line in rows.index]
        self.files = [str(v) for v in rows[mf.IMAGE]]
        self.mask_column = self.task.mask_column
        # A lesion mask beside an image-level target (Task.lesion_masks): read as the target's
        # mask is, and handed to the final evaluation as "lesion" (attention inside it).
        self.lesion_masks = (
            self.mask_column is None
            and self.task.lesion_masks
            and mf.MASK in rows.columns
            and bool(rows[mf.MASK].astype(str).str.strip().ne("").all())
        )
        if self.lesion_masks:
            self.mask_column = mf.MASK
        box_column = self.task.box_column
        self.with_boxes = box_column is not None
        self.boxes = []
        if box_column is not None:
            column = rows[box_column] if box_column in rows.columns else [""] * len(rows)
            for line, value in zip(self.lines, column, strict=True):
                self.boxes.append(_parse_boxes(value, line, spatial_dims))
        target_column = self.task.label_column
        if unlabelled:
            label_values = [0] * len(rows)  # not read: pseudo-labelling predicts the targets
        elif self.task.label_is_target and target_column in rows.columns:
            label_values = list(rows[target_column])
        elif mf.LABEL in rows.columns:
            label_values = [v if str(v).strip() else 0 for v in rows[mf.LABEL]]
        elif self.boxes:
            # The image's class: its boxes' largest kind, 0 without boxes (balanced sampling).
            label_values = [int(b[:, -1].max()) if len(b) else 0 for b in self.boxes]
        else:
            label_values = [0] * len(rows)
        if self.task.label_is_target and not unlabelled:
            labels = [
                _parse_target(self.task, v, line, num_classes)
                for line, v in zip(self.lines, label_values, strict=True)
            ]
        else:
            labels = [
                _parse_label(v, line) for line, v in zip(self.lines, label_values, strict=True)
            ]
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
        if self.lesion_masks:
            return {"image": image, "label": target, "lesion": torch.as_tensor(item["mask"])}
        return {"image": image, "label": target}


def attribute_table(rows: pd.DataFrame) -> pd.DataFrame:
    """``patient_id`` and every subgroup column of manifest rows (any column that is not an
    image, label or identifier), aligned with the rows, for the bias report."""
    structural = {mf.IMAGE, mf.STUDY_ID, mf.LABEL, mf.LABELS, *mf.PATH_COLUMNS, mf.BOXES}
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


def _parse_target(task: type[Task], value: Any, line: int, num_classes: int | None) -> Any:
    """A row's target by its task (``Task.parse_label``); a bad one names its line."""
    try:
        return task.parse_label(str(value).strip(), num_classes)
    except ValueError as exc:
        raise SiteDataError(f"line {line}: {exc}") from exc


def _parse_label(value: Any, line: int) -> int:
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not np.isfinite(number) or number != int(number):
        raise SiteDataError(f"line {line}: label {text!r} is not an integer class")
    return int(number)
