"""What ``radfl predict`` writes for a segmentation: the mask on the input's own grid, as NIfTI
(with the input's affine), and as DICOM SEG (highdicom) when the input was DICOM: a single-frame
or multi-frame file or a series folder.

The network predicts on its training grid (``image_size`` per axis, 3D volumes reoriented to
RAS). The label map is taken back to the input's grid: resized by nearest neighbour to the
(oriented) decoded shape and, for volumes, reoriented to the input's own axes. MONAI's DICOM
reader returns a 2D image as ``(columns, rows)``; the SEG frames undo its layout
(:func:`source_frames`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from client import data
from client.preprocessing import decode_image
from common.errors import SiteDataError


def native_mask(mask: np.ndarray, source: Path) -> tuple[np.ndarray, np.ndarray]:
    """``mask`` (the network's grid) on the grid of the image at ``source``, and that image's
    4x4 affine (voxel indices to patient millimetres, as MONAI's readers give it)."""
    import nibabel as nib

    image = decode_image(source)
    if not isinstance(image, MetaTensor):
        raise SiteDataError(f"{source}: the reader gave no affine")
    affine = np.asarray(image.affine, dtype=np.float64)
    labels = torch.as_tensor(mask.astype(np.int64))[None]
    if mask.ndim == 3:
        oriented = mt.Orientation(axcodes="RAS", labels=None)(image)
        if not isinstance(oriented, MetaTensor):
            raise SiteDataError(f"{source}: reorientation lost the affine")
        resized = mt.Resize(oriented.shape[1:], mode="nearest")(labels)
        back = mt.Orientation(axcodes="".join(nib.aff2axcodes(affine)), labels=None)(
            MetaTensor(torch.from_numpy(np.asarray(resized)), affine=oriented.affine)
        )
        native = np.asarray(back[0])
    else:
        native = np.asarray(mt.Resize(image.shape[-2:], mode="nearest")(labels)[0])
    if native.shape != tuple(image.shape[1 : 1 + mask.ndim]):
        raise SiteDataError(f"{source}: mask {native.shape} does not fit the image {image.shape}")
    return native.astype(np.uint8), affine


def write_nifti(mask: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """A label map as NIfTI with ``affine`` (a 2D map is stored as one slice)."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(path))


#: The patient and study attributes highdicom's ``Segmentation`` reads from its source.
_TYPE2_COPIED = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


def source_frames(mask: np.ndarray, source: Path) -> tuple[list[Any], np.ndarray]:
    """The DICOM datasets of ``source`` (a file or a series folder) and ``mask`` (a label map
    in MONAI's array layout) as their frames ``(frames, rows, columns)``, in their order.

    The inverse of MONAI's ``PydicomReader`` layout, which swaps the first two axes of what
    it stacks: a single frame ``(rows, columns)`` is read as ``(columns, rows)``; a multi-frame
    file's ``(frames, rows, columns)`` as ``(rows, frames, columns)``; a series' slices, sorted
    by InstanceNumber (slices without one are skipped), are stacked last, ``(columns, rows,
    slices)``.
    """
    import pydicom

    if source.is_dir():
        datasets = [pydicom.dcmread(f) for f in data.series_files(source)]
        datasets = sorted(
            (d for d in datasets if "InstanceNumber" in d), key=lambda d: int(d.InstanceNumber)
        )
        if mask.ndim != 3 or mask.shape[2] != len(datasets):
            raise SiteDataError(
                f"{source}: mask {mask.shape} does not stack the series' {len(datasets)} slices"
            )
        frames = np.moveaxis(np.swapaxes(mask, 0, 1), 2, 0)
    else:
        datasets = [pydicom.dcmread(source)]
        count = int(getattr(datasets[0], "NumberOfFrames", 1) or 1)
        if mask.ndim == 2 and count == 1:
            frames = mask.T[None]
        elif mask.ndim == 3 and count > 1:
            frames = np.swapaxes(mask, 0, 1)
        else:
            raise SiteDataError(f"{source}: a {mask.ndim}D mask for a file of {count} frame(s)")
        if len(frames) != count:
            raise SiteDataError(f"{source}: mask {mask.shape} does not hold its {count} frames")
    rows, columns = int(datasets[0].Rows), int(datasets[0].Columns)
    if frames.shape[1:] != (rows, columns):
        raise SiteDataError(f"{source}: mask frames {frames.shape[1:]} are not {rows}x{columns}")
    return datasets, frames


def write_dicom_seg(mask: np.ndarray, source: Path, path: Path, class_names: Sequence[str]) -> None:
    """The label map of the DICOM ``source`` (a single-frame or multi-frame file or a series
    folder; ``mask`` in MONAI's array layout, see :func:`source_frames`) as a binary DICOM
    SEG, one segment per non-background class, one frame per source frame or slice."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    datasets, frames = source_frames(mask, source)
    for dataset in datasets:
        # Type 2 (present, possibly empty) attributes the SEG copies from its source; files
        # without them (the synthetic sites' lack a birth date) get them empty, i.e. unknown.
        for keyword in _TYPE2_COPIED:
            if keyword not in dataset:
                setattr(dataset, keyword, "")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="RadFL federated model", version="1", family=codes.DCM.ArtificialIntelligence
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(name),
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, name in enumerate(class_names[1:], 1)
    ]
    seg = hd.seg.Segmentation(
        source_images=datasets,
        # One frame: the 2D form, which highdicom reads as a single-frame image's mask.
        pixel_array=(frames[0] if len(frames) == 1 else frames).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=9000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="RadFL",
        manufacturer_model_name="radfl predict",
        software_versions="1",
        device_serial_number="radfl",
        omit_empty_frames=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
