"""Byte-level format sniffing for the site check: what a file is from its first bytes (DICOM,
PNG, JPEG, NIfTI, NumPy), and the DICOM problems its header shows before any decoding.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pydicom

from client import data
from client.check_report import _short

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
