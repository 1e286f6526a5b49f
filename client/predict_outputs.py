"""What ``radfl predict`` writes for a segmentation: the mask on the input's own grid, as NIfTI
(with the input's affine), and as DICOM SEG (highdicom) when the input was a DICOM file.

The network predicts on its training grid (``image_size`` per axis, 3D volumes reoriented to
RAS). The label map is taken back to the input's grid: resized by nearest neighbour to the
(oriented) decoded shape and, for volumes, reoriented to the input's own axes. MONAI's DICOM
reader returns a 2D image as ``(columns, rows)``; the SEG frame is its transpose.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

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


def write_dicom_seg(mask: np.ndarray, source: Path, path: Path, class_names: Sequence[str]) -> None:
    """The label map of the single-frame DICOM ``source`` (MONAI's ``(columns, rows)``
    orientation) as a binary DICOM SEG, one segment per non-background class."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    dataset = pydicom.dcmread(source)
    if mask.ndim != 2 or int(getattr(dataset, "NumberOfFrames", 1) or 1) != 1:
        raise SiteDataError(f"{source}: DICOM SEG is written for single-frame 2D images only")
    frame = mask.T
    if frame.shape != (dataset.Rows, dataset.Columns):
        raise SiteDataError(
            f"{source}: mask {frame.shape} does not match {dataset.Rows}x{dataset.Columns}"
        )
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
        source_images=[dataset],
        pixel_array=frame.astype(np.uint8),
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
