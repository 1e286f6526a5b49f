"""Deterministic preprocessing of a site's images: read, channel first, orient, resample,
normalise by modality, resize, with masks and boxes moved along.

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
5. per image, zero mean and unit variance (``NormalizeIntensityd``), as the in-memory synthetic
   hospitals are (``client.site.normalize_intensity``). Step 3 alone leaves each site's level:
   on the synthetic hospitals the mean image was 0.19 (CT window), 0.33 (MR) and 0.41 (DX),
   which a pooled model learnt as a hospital, and so as a prevalence, and the federated
   validation curve swung (the largest fall after round 5 was 0.225 on disk against 0.017 in
   memory, seed 0, default run);
6. a plain ``float32`` tensor (no MONAI metadata).
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai import transforms as mt
from monai.apps.detection.transforms import dictionary as mdt

from common.errors import SiteDataError
from common.imaging import DEFAULT_CT_WINDOW_HU, PERCENTILES

__all__ = ["DEFAULT_CT_WINDOW_HU", "PERCENTILES", "image_transforms", "preprocessing_key"]

# Bump when the preprocessing changes in a way the settings below do not capture: it renames the
# cache folder, so stale tensors are never read.
_PREPROCESS_VERSION = 2  # 2: per-image z-score (step 5)


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
        mt.NormalizeIntensityd(keys),
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


class _ByModality(mt.MapTransform):
    """Runs the preprocessing of the item's modality and counts the decodes it performs."""

    def __init__(self, pipelines: dict[str, mt.Compose]) -> None:
        super().__init__(keys=["image"])
        self.pipelines = pipelines
        self.calls = 0

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.calls += 1
        return self.pipelines[data["normalisation"]](dict(data))  # type: ignore[no-any-return]
