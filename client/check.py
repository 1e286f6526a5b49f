"""``radfl site check DIR``: decode every image of a site and report each problem by row and file.

The check reads the manifest (``common.manifest``) and decodes every image's pixel data, and
every mask's, with the loader's own readers (``client.data.decode_image``), so a site that passes
also loads. It never stops at the first problem and never crashes on a bad file: each problem
becomes a ``Problem`` with its CSV line (header = line 1) and file. It reports

* missing values in required columns, paths that leave the site folder, missing files;
* files that are not what their extension says, from their first bytes: ``DICM`` at byte 128
  (DICOM), the PNG and JPEG signatures, the gzip magic of ``.nii.gz`` and the NIfTI header size
  (348 or 540) inside, the ``.npy`` magic;
* unreadable, corrupt or truncated files: DICOM pixel data shorter than its header promises, a
  DICOM without pixel data, and anything the reader raises while decoding;
* wrong dimensionality (2D image for a 3D task and vice versa, single-slice volumes for a 3D
  task), wrong channel count (colour images, 4D volumes), modalities the loader does not
  normalise (``client.data.SUPPORTED_MODALITIES``; SR, PR...), and a manifest modality that
  contradicts the DICOM tag;
* NaN or infinite voxels;
* labels that are not integers in ``[0, num_classes)``, sex values other than F/M/O, ages that
  are not numbers; segmentation mask values outside ``[0, num_classes)``; detection boxes that
  are not ``[x0, y0, (z0,) x1, y1, (z1,) class]`` inside the image;
* masks (``mask``, ``instance_mask`` columns, whenever present, whatever the task) whose shape
  differs from their image's;
* duplicate rows (every cell equal, or the same image listed twice; the first stays usable);
* patients whose rows disagree on sex, and studies whose rows disagree on age: every row of
  such a patient or study is reported, since the check cannot tell which one is right.

Subgroup values empty in the manifest come from the DICOM header (``fill_subgroups_from_dicom``).
Class and subgroup counts are over usable rows (rows without a problem).

``load_checked_site`` is what training calls: it refuses a site whose check fails, with the same
messages, unless the site opted into skipping bad rows; it never returns zero rows. Its result is
stored under the site's cache folder, keyed by the manifest, every named file's stamp (size,
modification time, inode, status-change time: ``data.file_stamp``) and the settings, so later
rounds neither check nor decode again.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import logging
import math
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom
import torch
from monai.data import MetaTensor

from client import data
from client.data import SiteDataError
from common import manifest as mf
from common.tasks import list_tasks

log = logging.getLogger(__name__)

REPORT_NAME = "radfl-check.json"
"""Default name of the JSON report, written in the site folder."""

_CHECK_VERSION = 1  # bump when the check changes, so stored results are not reused

_KNOWN_COLUMNS = {
    mf.IMAGE,
    mf.PATIENT_ID,
    mf.STUDY_ID,
    mf.LABEL,
    mf.MASK,
    mf.BOXES,
    mf.INSTANCE_MASK,
    *mf.SUBGROUP_COLUMNS,
}
_SEX_VALUES = ("F", "M", "O")
_PATIENT_LEVEL = (mf.SEX,)  # a patient has one value
_STUDY_LEVEL = (mf.AGE,)  # a study has one value
_MAX_MESSAGE = 300

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Problem:
    """One problem of a site: its CSV line (``None`` for the whole site), file, kind, message."""

    line: int | None
    file: str | None
    kind: str
    message: str

    def format(self) -> str:
        """``line 7: images/p3.dcm: truncated DICOM pixel data (...)``."""
        parts = [f"line {self.line}" if self.line is not None else None, self.file, self.message]
        return ": ".join(p for p in parts if p)


@dataclass
class CheckReport:
    """What ``check_site`` found: every problem, and class and subgroup counts of usable rows."""

    root: str
    task: str
    spatial_dims: int
    num_classes: int
    rows: int
    problems: list[Problem] = field(default_factory=list)
    class_counts: dict[str, int] = field(default_factory=dict)
    subgroup_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No problem at all."""
        return not self.problems

    @property
    def bad_lines(self) -> set[int]:
        """CSV lines with at least one problem."""
        return {p.line for p in self.problems if p.line is not None}

    @property
    def site_problems(self) -> list[Problem]:
        """Problems of the whole site (no line): no row can be used."""
        return [p for p in self.problems if p.line is None]

    @property
    def usable_rows(self) -> int:
        return 0 if self.site_problems else self.rows - len(self.bad_lines)

    def problem_lines(self) -> list[str]:
        """One line of text per problem, in CSV order."""
        ordered = sorted(self.problems, key=lambda p: (p.line is not None, p.line or 0))
        return [p.format() for p in ordered]

    def format_text(self) -> str:
        """The human-readable report: a summary, every problem, class and subgroup counts."""
        dims = f"{self.spatial_dims}D"
        out = [
            f"site check of {self.root} (task {self.task}, {dims}, {self.num_classes} classes): "
            f"{self.rows} rows, {self.usable_rows} usable, {len(self.problems)} problem(s)"
        ]
        out += self.problem_lines()
        if self.class_counts:
            out.append("class counts (usable rows):")
            width = max(len(k) for k in self.class_counts)
            out += [f"  class {k:>{width}}  {n}" for k, n in self.class_counts.items()]
        if self.subgroup_counts:
            out.append("subgroup counts (usable rows):")
            width = max(len(k) for k in self.subgroup_counts)
            for column, counts in self.subgroup_counts.items():
                values = ", ".join(f"{value} {n}" for value, n in counts.items()) or "none"
                out.append(f"  {column:<{width}}  {values}")
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "task": self.task,
            "spatial_dims": self.spatial_dims,
            "num_classes": self.num_classes,
            "rows": self.rows,
            "usable_rows": self.usable_rows,
            "ok": self.ok,
            "problems": [dataclasses.asdict(p) for p in self.problems],
            "class_counts": self.class_counts,
            "subgroup_counts": self.subgroup_counts,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write_json(self, path: Path) -> None:
        """Write the report; readers in other processes never see a half-written file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_text(self.to_json() + "\n")
        os.replace(partial, path)

    @classmethod
    def from_json(cls, text: str) -> CheckReport:
        raw = json.loads(text)
        return cls(
            root=raw["root"],
            task=raw["task"],
            spatial_dims=int(raw["spatial_dims"]),
            num_classes=int(raw["num_classes"]),
            rows=int(raw["rows"]),
            problems=[Problem(**p) for p in raw["problems"]],
            class_counts={str(k): int(v) for k, v in raw["class_counts"].items()},
            subgroup_counts={
                str(c): {str(k): int(v) for k, v in counts.items()}
                for c, counts in raw["subgroup_counts"].items()
            },
        )


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------


def check_site(
    root: Path,
    *,
    task: str,
    spatial_dims: int,
    num_classes: int,
    progress: Progress | None = None,
) -> CheckReport:
    """Check every row of the site at ``root``; decode every image and mask.

    Parameters
    ----------
    progress
        Called as ``progress(done, total)`` after each row (the CLI prints every 10 %).

    Raises
    ------
    SiteDataError
        Only for bad arguments (unknown task, ``spatial_dims`` not 2 or 3, ``num_classes`` < 1)
        or a ``root`` that is not a folder; problems of the site's data are reported instead.
    """
    root = Path(root)
    _check_arguments(root, task, spatial_dims, num_classes)
    report = CheckReport(
        root=str(root), task=task, spatial_dims=spatial_dims, num_classes=num_classes, rows=0
    )
    try:
        raw = data.read_manifest(root, task)
    except SiteDataError as exc:
        report.problems.append(Problem(None, mf.MANIFEST_NAME, "manifest", _site_message(exc)))
        return report
    report.rows = len(raw)
    if raw.empty:
        report.problems.append(
            Problem(None, mf.MANIFEST_NAME, "manifest", "the manifest has no data rows")
        )
        return report
    table = data.fill_subgroups_from_dicom(raw, root)
    checker = _RowChecker(root, task, spatial_dims, num_classes)
    for done, (line, row) in enumerate(table.iterrows(), start=1):
        line = int(line)
        manifest_modality = raw.at[line, mf.MODALITY] if mf.MODALITY in raw.columns else ""
        try:
            report.problems += checker.check(line, row, manifest_modality)
        except Exception as exc:  # a check must report, never crash on a bad file
            report.problems.append(
                Problem(line, row[mf.IMAGE] or None, "error", f"check failed: {_short(exc)}")
            )
        if progress is not None:
            progress(done, len(table))
    report.problems += _duplicate_problems(table)
    report.problems += _conflict_problems(table)
    report.problems.sort(key=lambda p: (p.line is not None, p.line or 0))
    usable = table.drop(index=list(report.bad_lines))
    report.class_counts = _class_counts(usable, task, num_classes)
    report.subgroup_counts = _subgroup_counts(usable)
    return report


def _check_arguments(root: Path, task: str, spatial_dims: int, num_classes: int) -> None:
    data.site_task(task)
    if spatial_dims not in (2, 3):
        raise SiteDataError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if num_classes < 1:
        raise SiteDataError(f"num_classes must be at least 1, got {num_classes}")
    if not root.is_dir():
        raise SiteDataError(f"{root}: the site folder does not exist")


class _RowChecker:
    """The checks of one manifest row."""

    def __init__(self, root: Path, task: str, spatial_dims: int, num_classes: int) -> None:
        self.root = root
        self.task = data.site_task(task)
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes

    def check(self, line: int, row: pd.Series, manifest_modality: str) -> list[Problem]:
        problems: list[Problem] = []

        def add(file: str | None, kind: str, message: str) -> None:
            problems.append(Problem(line, file or None, kind, message))

        image = row[mf.IMAGE]
        for column in (*mf.REQUIRED_COLUMNS, *self.task.required_columns):
            if not row[column]:
                add(image, "missing-value", f"empty {column}")
        if self.task.label_is_target and row[mf.LABEL]:
            message = _label_problem(row[mf.LABEL], self.num_classes)
            if message:
                add(image, "label", message)
        problems += [
            Problem(line, image or None, "subgroup", m) for m in _subgroup_value_problems(row)
        ]
        modality = str(row.get(mf.MODALITY, "")).upper()
        if modality and modality not in data.SUPPORTED_MODALITIES:
            add(image, "modality", _modality_message(modality))
        if not image:
            return problems

        decoded = self._image(image, manifest_modality, add)
        spatial_shape = tuple(decoded.shape[1:]) if decoded is not None else None
        for column in (mf.MASK, mf.INSTANCE_MASK):
            if column in row.index and row[column]:
                self._mask(column, row[column], spatial_shape, add)
        boxes = self.task.box_column
        if boxes is not None and row[boxes]:
            for message in _box_problems(
                row[boxes], self.spatial_dims, spatial_shape, self.num_classes
            ):
                add(image, "boxes", message)
        return list(dict.fromkeys(problems))  # the manifest and the DICOM tag may say the same

    # -- images ----------------------------------------------------------------------------

    def _existing(self, relative: str, add: Callable[[str | None, str, str], None]) -> Path | None:
        try:
            path = data.resolve_path(self.root, relative)
        except SiteDataError:
            add(relative, "outside-site", "the path leaves the site folder")
            return None
        if not path.exists():
            add(relative, "missing-file", "file not found")
            return None
        expected = _expected_format(path)
        if expected is None:
            add(
                relative,
                "wrong-format",
                f"unsupported file type (expected a DICOM series folder or one of "
                f"{', '.join(mf.IMAGE_SUFFIXES)})",
            )
            return None
        if expected != "series":
            found = sniff_format(path)
            if found != expected:
                add(
                    relative,
                    "wrong-format",
                    f"not a {_FORMAT_NAMES[expected]} file despite its extension "
                    f"(looks like {_FORMAT_NAMES.get(found, found)})",
                )
                return None
        return path

    def _image(
        self, relative: str, manifest_modality: str, add: Callable[[str | None, str, str], None]
    ) -> torch.Tensor | None:
        path = self._existing(relative, add)
        if path is None:
            return None
        if data.is_dicom_path(path):
            messages, tag_modality = _dicom_problems(path)
            for kind, message in messages:
                add(relative, kind, message)
            if tag_modality and manifest_modality and tag_modality != manifest_modality.upper():
                add(
                    relative,
                    "modality",
                    f"manifest modality {manifest_modality} contradicts the DICOM tag "
                    f"{tag_modality}",
                )
            if any(kind in ("unreadable", "truncated", "no-pixel-data") for kind, _ in messages):
                return None
        try:
            image = _plain(data.decode_image(path))
        except Exception as exc:
            add(relative, "unreadable", f"cannot decode the pixel data: {_short(exc)}")
            return None
        self._shape(relative, image, add)
        _finite(relative, image, "voxel", add)
        return image

    def _shape(
        self, relative: str, image: torch.Tensor, add: Callable[[str | None, str, str], None]
    ) -> None:
        channels, spatial = int(image.shape[0]), tuple(int(s) for s in image.shape[1:])
        size = "×".join(str(s) for s in spatial)
        if len(spatial) != self.spatial_dims:
            add(
                relative,
                "dimensionality",
                f"{len(spatial)}D image ({size}) for a {self.spatial_dims}D task",
            )
        elif self.spatial_dims == 3 and min(spatial) < 2:
            add(relative, "dimensionality", f"single-slice volume ({size}) for a 3D task")
        if channels == 1:
            return
        if channels in (3, 4) and len(spatial) == 2:
            colour = image[:3].float()
            if bool(torch.all(torch.abs(colour - colour[:1]) <= 2.0)):
                return  # greyscale stored as RGB(A): the loader keeps one channel
            add(relative, "channels", "colour image; the networks take one grey channel")
            return
        add(relative, "channels", f"{channels} channels (or frames); the networks take one")

    def _mask(
        self,
        column: str,
        relative: str,
        image_shape: tuple[int, ...] | None,
        add: Callable[[str | None, str, str], None],
    ) -> None:
        path = self._existing(relative, add)
        if path is None:
            return
        try:
            mask = _plain(data.decode_image(path))
        except Exception as exc:
            add(relative, "unreadable", f"cannot decode the {column}: {_short(exc)}")
            return
        if not _finite(relative, mask, f"{column} voxel", add):
            return
        shape = tuple(int(s) for s in mask.shape[1:])
        if mask.shape[0] != 1:
            add(relative, "channels", f"{column} has {mask.shape[0]} channels; expected one")
        if image_shape is not None and shape != image_shape:
            add(
                relative,
                "mask-shape",
                f"{column} shape {'×'.join(map(str, shape))} differs from the image's "
                f"{'×'.join(map(str, image_shape))}",
            )
        values = torch.unique(mask)
        if not bool(torch.all(values == torch.round(values))):
            add(relative, "mask-values", f"{column} holds non-integer values")
        elif column == self.task.mask_column and not self.task.numbered_instances:
            bad = [int(v) for v in values if not 0 <= int(v) < self.num_classes]
            if bad:
                add(
                    relative,
                    "label",
                    f"mask values {_list(bad)} outside [0, {self.num_classes})",
                )
        elif column == mf.INSTANCE_MASK and bool(torch.any(values < 0)):
            add(relative, "mask-values", f"{column} holds negative values")


def _finite(
    relative: str, image: torch.Tensor, what: str, add: Callable[[str | None, str, str], None]
) -> bool:
    if not torch.is_floating_point(image) or bool(torch.isfinite(image).all()):
        return True
    n_nan = int(torch.isnan(image).sum())
    n_inf = int(torch.isinf(image).sum())
    if n_nan or n_inf:
        add(relative, "non-finite", f"{n_nan} NaN and {n_inf} infinite {what}s")
        return False
    return True


def _plain(image: torch.Tensor) -> torch.Tensor:
    # MONAI's MetaTensor tracks metadata through every operation: slow for whole-volume checks.
    return image.as_tensor() if isinstance(image, MetaTensor) else image


# -- formats --------------------------------------------------------------------------------

_FORMAT_NAMES = {
    "dicom": "DICOM",
    "nifti": "NIfTI",
    "nifti-gz": "gzipped NIfTI",
    "png": "PNG",
    "jpeg": "JPEG",
    "npy": "NumPy .npy",
    "gzip": "gzip data that is not NIfTI",
    "text": "text",
    "empty": "an empty file",
    "unknown": "unrecognised binary data",
}


def _expected_format(path: Path) -> str | None:
    """The format a path's extension promises (``series`` for a folder), or ``None``."""
    if path.is_dir():
        return "series"
    name = path.name.lower()
    for suffix, kind in (
        (".nii.gz", "nifti-gz"),
        (".nii", "nifti"),
        (".dcm", "dicom"),
        (".png", "png"),
        (".jpg", "jpeg"),
        (".jpeg", "jpeg"),
        (".npy", "npy"),
    ):
        if name.endswith(suffix):
            return kind
    return None


def sniff_format(path: Path) -> str:
    """What a file's first bytes say it is: ``dicom``, ``nifti``, ``nifti-gz``, ``png``, ..."""
    with open(path, "rb") as stream:
        head = stream.read(512)
    if not head:
        return "empty"
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path, "rb") as stream:
                inner = stream.read(4)
        except (OSError, EOFError):
            return "gzip"
        return "nifti-gz" if _nifti_header_size(inner) else "gzip"
    if _nifti_header_size(head[:4]):
        return "nifti"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "text"
        except UnicodeDecodeError:
            pass
    return "unknown"


def _nifti_header_size(first4: bytes) -> bool:
    return len(first4) == 4 and (
        int.from_bytes(first4, "little") in (348, 540)
        or int.from_bytes(first4, "big") in (348, 540)
    )


def _dicom_problems(path: Path) -> tuple[list[tuple[str, str]], str]:
    """``(kind, message)`` pairs for a DICOM file or series folder, and its Modality tag."""
    if path.is_dir():
        files = data.series_files(path)
        if not files:
            return [("wrong-format", "the folder holds no DICOM file")], ""
        problems: list[tuple[str, str]] = []
        modality = ""
        for file in files:
            found, file_modality = _dicom_file_problems(file, in_series=True)
            modality = modality or file_modality
            problems += [(kind, f"slice {file.name}: {message}") for kind, message in found]
        return problems, modality
    return _dicom_file_problems(path)


def _dicom_file_problems(
    path: Path, *, in_series: bool = False
) -> tuple[list[tuple[str, str]], str]:
    try:
        dataset = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types on corrupt headers
        return [("unreadable", f"cannot read the DICOM header: {_short(exc)}")], ""
    problems: list[tuple[str, str]] = []
    modality = str(dataset.get("Modality", "")).strip().upper()
    if modality and modality not in data.SUPPORTED_MODALITIES:
        problems.append(("modality", _modality_message(modality)))
    if in_series and "InstanceNumber" not in dataset:
        problems.append(("unreadable", "no InstanceNumber; the series reader skips it"))
    pixel_keyword = next(
        (k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in dataset), None
    )
    if pixel_keyword is None:
        sop = dataset.get("SOPClassUID")
        what = f"SOP class {sop.name}" if sop is not None else "no SOP class"
        return problems + [
            ("no-pixel-data", f"no pixel data (a truncated file, or not an image: {what})")
        ], modality
    syntax = getattr(dataset.get("file_meta", None), "TransferSyntaxUID", None)
    if pixel_keyword == "PixelData" and syntax is not None and not syntax.is_compressed:
        expected = _expected_pixel_bytes(dataset)
        found = len(dataset.PixelData)
        if expected is not None and found < expected:
            problems.append(
                (
                    "truncated",
                    f"truncated DICOM pixel data (expected {expected} bytes, found {found})",
                )
            )
    return problems, modality


def _expected_pixel_bytes(dataset: pydicom.Dataset) -> int | None:
    try:
        from pydicom.pixels.utils import get_expected_length

        return int(get_expected_length(dataset, unit="bytes"))
    except (AttributeError, KeyError, TypeError, ValueError, ImportError):
        return None


def _modality_message(modality: str) -> str:
    return (
        f"modality {modality} is not supported (supported: {', '.join(data.SUPPORTED_MODALITIES)})"
    )


# -- values ---------------------------------------------------------------------------------


def _label_problem(value: str, num_classes: int) -> str | None:
    try:
        number = float(value)
    except ValueError:
        return f"label {value!r} is not an integer"
    if not math.isfinite(number) or number != int(number):
        return f"label {value!r} is not an integer"
    if not 0 <= number < num_classes:
        return f"label {int(number)} outside [0, {num_classes})"
    return None


def _subgroup_value_problems(row: pd.Series) -> list[str]:
    problems = []
    sex = row.get(mf.SEX, "")
    if sex and sex.upper() not in _SEX_VALUES:
        problems.append(f"sex {sex!r} is not one of {', '.join(_SEX_VALUES)}")
    age = row.get(mf.AGE, "")
    if age and _age_years(age) is None:
        problems.append(f"age {age!r} is not a number of years")
    return problems


def _age_years(value: str) -> float | None:
    try:
        years = float(value)
    except ValueError:
        return None
    return years if math.isfinite(years) and 0 <= years < 150 else None


def age_band(value: str) -> str:
    """``<40``, ``40-59``, ``60+`` or ``unknown``."""
    years = _age_years(value) if value else None
    if years is None:
        return "unknown"
    return "<40" if years < 40 else "40-59" if years < 60 else "60+"


def _box_problems(
    text: str, spatial_dims: int, shape: tuple[int, ...] | None, num_classes: int
) -> list[str]:
    try:
        boxes = json.loads(text)
    except json.JSONDecodeError as exc:
        return [f"boxes are not valid JSON: {exc}"]
    if not isinstance(boxes, list):
        return ["boxes must be a JSON list of boxes"]
    problems = []
    width = 2 * spatial_dims + 1
    for i, box in enumerate(boxes):
        if (
            not isinstance(box, list)
            or len(box) != width
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
        ):
            problems.append(f"box {i} is not a list of {width} numbers")
            continue
        low, high, label = box[:spatial_dims], box[spatial_dims:-1], box[-1]
        if any(lo >= hi for lo, hi in zip(low, high, strict=True)):
            problems.append(f"box {i} is empty or inverted")
        if shape is not None and any(
            lo < 0 or hi > s for lo, hi, s in zip(low, high, shape, strict=False)
        ):
            problems.append(f"box {i} leaves the image ({'×'.join(map(str, shape))})")
        if label != int(label) or not 0 <= label < num_classes:
            problems.append(f"box {i} class {label} outside [0, {num_classes})")
    return problems


# -- rows against rows ----------------------------------------------------------------------


def _duplicate_problems(table: pd.DataFrame) -> list[Problem]:
    problems = []
    seen_rows: dict[tuple[str, ...], int] = {}
    seen_images: dict[str, int] = {}
    for line, row in table.iterrows():
        cells = tuple(row.tolist())
        image = row[mf.IMAGE]
        if cells in seen_rows:
            problems.append(
                Problem(
                    int(line),
                    image or None,
                    "duplicate",
                    f"duplicate of line {seen_rows[cells]} (every cell equal)",
                )
            )
            continue
        seen_rows[cells] = int(line)
        if not image:
            continue
        key = os.path.normpath(image.replace("\\", "/"))
        if key in seen_images:
            problems.append(
                Problem(
                    int(line), image, "duplicate", f"image also listed on line {seen_images[key]}"
                )
            )
        else:
            seen_images[key] = int(line)
    return problems


def _conflict_problems(table: pd.DataFrame) -> list[Problem]:
    problems = []
    for columns, keys, what in (
        (_PATIENT_LEVEL, [mf.PATIENT_ID], "patient"),
        (_STUDY_LEVEL, [mf.PATIENT_ID, mf.STUDY_ID], "study"),
    ):
        for column in columns:
            if column not in table.columns:
                continue
            for key, group in table.groupby(keys, sort=False):
                values: dict[str, list[int]] = defaultdict(list)
                for line, value in group[column].items():
                    if value:
                        values[_canonical(column, value)].append(int(line))
                if len(values) < 2:
                    continue
                name = key[-1] if isinstance(key, tuple) else key
                listing = "; ".join(f"{v} on line(s) {_list(lines)}" for v, lines in values.items())
                message = f"{what} {name} has conflicting {column}: {listing}"
                for line in sorted(line for lines in values.values() for line in lines):
                    problems.append(
                        Problem(
                            line, table.at[line, mf.IMAGE] or None, "conflicting-subgroup", message
                        )
                    )
    return problems


def _canonical(column: str, value: str) -> str:
    if column == mf.AGE:
        years = _age_years(value)
        return value if years is None else f"{years:g}"
    return value.upper() if column in (mf.SEX, mf.MODALITY) else value


# -- counts ---------------------------------------------------------------------------------


def _class_counts(table: pd.DataFrame, task: str, num_classes: int) -> dict[str, int]:
    if not data.site_task(task).label_is_target:
        return {}
    counts = Counter(int(float(v)) for v in table[mf.LABEL])
    return {str(c): counts.get(c, 0) for c in range(num_classes)}


def _subgroup_counts(table: pd.DataFrame) -> dict[str, dict[str, int]]:
    columns = [*mf.SUBGROUP_COLUMNS, *(c for c in table.columns if c not in _KNOWN_COLUMNS)]
    counts: dict[str, dict[str, int]] = {}
    for column in columns:
        if column not in table.columns:
            continue
        if column == mf.AGE:
            values: Iterable[str] = (age_band(v) for v in table[column])
            order = ["<40", "40-59", "60+", "unknown"]
        else:
            values = (v or "unknown" for v in table[column])
            order = []
        counter = Counter(values)
        keys = [k for k in order if k in counter] + sorted(k for k in counter if k not in order)
        counts[column] = {k: counter[k] for k in keys}
    return counts


def _list(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values)


def _short(exc: BaseException) -> str:
    """An exception as one line of bounded length (MONAI's reader errors span many lines)."""
    exc = data.transform_error_cause(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _site_message(exc: SiteDataError) -> str:
    # read_manifest names the manifest's full path; the Problem's file already says it.
    return str(exc).split(": ", 1)[-1]


# --------------------------------------------------------------------------------------------
# Training's entry point
# --------------------------------------------------------------------------------------------


def load_checked_site(
    root: Path,
    *,
    task: str,
    spatial_dims: int,
    num_classes: int,
    image_size: int,
    skip_bad_rows: bool,
    cache_dir: Path | None = None,
    ct_window_hu: tuple[float, float] = data.DEFAULT_CT_WINDOW_HU,
    spacing_mm: Sequence[float] | None = None,
    progress: Progress | None = None,
) -> tuple[pd.DataFrame, CheckReport]:
    """The rows training may use, and the check report; refuse a site whose check fails.

    The first call checks the site and preprocesses every usable row into
    the loader's cache (``SiteDataset``), so preprocessing failures are reported by row too and
    the first epoch reads the cache. The report is stored under ``cache_dir`` (default
    ``ROOT/.radfl-cache``), keyed by the manifest, the stamp of every file it names (size,
    modification time, inode, status-change time) and the settings; later calls with an
    unchanged site reuse it without decoding.

    Returns
    -------
    rows, report
        The usable manifest rows (indexed by CSV line, subgroups filled from DICOM) and the
        report, whose ``problems`` name the rows left out when ``skip_bad_rows`` is true.

    Raises
    ------
    SiteDataError
        If the check found problems and ``skip_bad_rows`` is false (the message holds every
        problem line), if the site as a whole is unusable (manifest missing or malformed), or if
        no usable row remains.
    """
    root = Path(root)
    _check_arguments(root, task, spatial_dims, num_classes)
    cache_root = Path(cache_dir) if cache_dir is not None else root / data.CACHE_FOLDER
    try:
        table = data.read_manifest(root, task)
    except SiteDataError as exc:
        raise SiteDataError(f"site check of {root} failed: {exc}") from exc
    settings = {
        "check": _CHECK_VERSION,
        "task": task,
        "spatial_dims": spatial_dims,
        "num_classes": num_classes,
        "preprocessing": data.preprocessing_key(spatial_dims, image_size, ct_window_hu, spacing_mm),
    }
    stored = cache_root / "checks" / f"{_site_fingerprint(root, table, settings)}.json"
    table = data.fill_subgroups_from_dicom(table, root)
    report = _stored_report(stored)
    if report is not None:
        log.info("site %s: reusing the check stored in %s", root, stored)
    else:
        report = check_site(
            root, task=task, spatial_dims=spatial_dims, num_classes=num_classes, progress=progress
        )
        if not report.site_problems:
            _warm_cache(
                report,
                table,
                root,
                task,
                spatial_dims,
                image_size,
                cache_root,
                ct_window_hu,
                spacing_mm,
            )
        report.write_json(stored)

    if report.site_problems or (report.problems and not skip_bad_rows):
        hint = (
            ""
            if report.site_problems
            else ("\nfix these rows, or let the site skip bad rows (they are then reported)")
        )
        raise SiteDataError(
            f"site check of {root} failed with {len(report.problems)} problem(s):\n"
            + "\n".join(report.problem_lines())
            + hint,
            problems=len(report.problems),
        )
    usable = table.drop(index=[line for line in report.bad_lines if line in table.index])
    if usable.empty:
        raise SiteDataError(
            f"site {root} has no usable samples: every one of its {report.rows} rows has a "
            "problem:\n" + "\n".join(report.problem_lines()),
            problems=len(report.problems),
        )
    if report.problems:
        log.warning(
            "site %s: skipping %d of %d rows with problems:\n%s",
            root,
            len(report.bad_lines),
            report.rows,
            "\n".join(report.problem_lines()),
        )
    return usable, report


def _stored_report(path: Path) -> CheckReport | None:
    try:
        return CheckReport.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the unreadable stored check %s: %s", path, exc)
        return None


def _warm_cache(
    report: CheckReport,
    table: pd.DataFrame,
    root: Path,
    task: str,
    spatial_dims: int,
    image_size: int,
    cache_root: Path,
    ct_window_hu: tuple[float, float],
    spacing_mm: Sequence[float] | None,
) -> None:
    """Preprocess every usable row into the loader's cache; report the rows that fail."""
    usable = table.drop(index=list(report.bad_lines))
    if usable.empty:
        return
    dataset = data.SiteDataset(
        usable,
        root,
        task=task,
        spatial_dims=spatial_dims,
        image_size=image_size,
        cache_dir=cache_root,
        ct_window_hu=ct_window_hu,
        spacing_mm=spacing_mm,
    )
    failed = []
    for index in range(len(dataset)):
        try:
            dataset[index]
        except SiteDataError as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            failed.append(
                Problem(
                    dataset.lines[index],
                    dataset.files[index],
                    "preprocess",
                    f"preprocessing failed: {_short(cause)}",
                )
            )
    if failed:
        report.problems = sorted(
            report.problems + failed, key=lambda p: (p.line is not None, p.line or 0)
        )
        failed_lines = {p.line for p in failed}
        still_usable = usable.drop(index=list(failed_lines))
        report.class_counts = _class_counts(still_usable, task, report.num_classes)
        report.subgroup_counts = _subgroup_counts(still_usable)


def _site_fingerprint(root: Path, table: pd.DataFrame, settings: Mapping[str, Any]) -> str:
    """A hash of the manifest, the stamp of every file it names, and ``settings``."""
    digest = hashlib.sha256()
    digest.update((root / mf.MANIFEST_NAME).read_bytes())
    digest.update(json.dumps(dict(settings), sort_keys=True).encode())
    for column in mf.PATH_COLUMNS:
        if column not in table.columns:
            continue
        for relative in table[column]:
            if not relative:
                continue
            try:
                stamp = data.file_stamp(data.resolve_path(root, relative))
            except (OSError, SiteDataError):
                stamp = "missing"
            digest.update(f"{column}:{relative}={stamp}\n".encode())
    return digest.hexdigest()[:24]


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``radfl site check``."""
    parser.add_argument("dir", type=Path, metavar="DIR", help="the site folder (manifest.csv)")
    parser.add_argument("--task", default="classification", choices=list_tasks(), help="the task")
    parser.add_argument(
        "--dims", type=int, default=2, choices=(2, 3), help="spatial dimensions of the task"
    )
    parser.add_argument("--num-classes", type=int, default=2, help="number of classes")
    parser.add_argument(
        "--report", type=Path, default=None, help=f"JSON report path (default DIR/{REPORT_NAME})"
    )


def site_check(args: argparse.Namespace) -> int:
    """Run the check, print the report, write the JSON; 0 when clean, 1 when problems."""
    root = Path(args.dir)
    report = check_site(
        root,
        task=args.task,
        spatial_dims=args.dims,
        num_classes=args.num_classes,
        progress=_print_progress,
    )
    print(report.format_text())
    path = Path(args.report) if args.report is not None else root / REPORT_NAME
    report.write_json(path)
    print(f"report written to {path}")
    return 0 if report.ok else 1


def _print_progress(done: int, total: int) -> None:
    step = max(1, total // 10)
    if total >= 20 and (done % step == 0 or done == total):
        print(f"checked {done}/{total} images", file=sys.stderr, flush=True)
