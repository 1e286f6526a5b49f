"""The site check of one manifest row: its values, its image and masks decoded with the
loader's readers, its boxes. Each finding is a ``Problem`` naming the row's line and file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from monai.data import MetaTensor

from client import data
from client.check_formats import (
    _FORMAT_NAMES,
    _dicom_problems,
    _expected_format,
    _modality_message,
    sniff_format,
)
from client.check_report import _SEX_VALUES, Problem, _list, _short
from client.data import SiteDataError
from common import manifest as mf

#: The kind of problem of a row whose target is blank: an unlabelled study, usable only with
#: pseudo-labelling (``load_checked_site(unlabelled_ok=True)``).
UNLABELLED = "unlabelled"


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
        target = self.task.label_column if self.task.label_is_target else None
        for column in (*mf.REQUIRED_COLUMNS, *self.task.required_columns):
            if not row[column] and column == target:
                # Training refuses it unless pseudo-labelling takes unlabelled studies.
                add(image, UNLABELLED, f"empty {column}: an unlabelled study")
            elif not row[column]:
                add(image, "missing-value", f"empty {column}")
        if target is not None and row[target]:
            try:
                self.task.parse_label(row[target], self.num_classes)
            except ValueError as exc:
                add(image, "label", str(exc))
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
