"""PNG overlays of ``radfl predict`` (``--overlays``): the input on its own grid, with the
intensities the model saw (the CT window, or the percentile scaling of other modalities, of
``client.preprocessing``), and the prediction drawn on it: a label map's regions (tinted, with
their outlines), boxes with their class and score, a heat map, and a caption (the
classification's probability, or counts).

Orientation: a 2D image is drawn as stored (DICOM rows down, columns across; MONAI reads it as
``(columns, rows)``, so the picture is its transpose). A volume is reoriented to LPS and its
axial slice drawn the radiological way (anterior up, the patient's right on the viewer's
left); the slice is the one with most of the drawn label map, else the best box's centre, else
the heat map's peak, else the middle.

:func:`write_heat_map` draws a heat map on the network's grid (Grad-CAM) over the input: the
explanation helper calls it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from client.preprocessing import decode_image, normalisation_for
from common.imaging import PERCENTILES
from common.tasks.base import Overlay

#: The picture's long side is enlarged to at least this many pixels (nearest neighbour), so
#: that a 32-pixel image still shows its boxes and caption.
MIN_SIDE_PX = 384
#: Boxes scoring below this are not drawn (the simulation's validation pictures use it too).
DRAWN_SCORE = Overlay.SCORE
_COLOURS = ((255, 64, 64), (64, 200, 255), (255, 220, 0), (200, 90, 255), (64, 255, 120))


def windowed_image(source: Path, modality: str, metadata: Mapping[str, Any]) -> MetaTensor:
    """The input on its own grid (one channel, its affine kept), scaled to [0, 1] as the
    site's preprocessing scales it (before resizing)."""
    image: Any = decode_image(source)
    if not isinstance(image, MetaTensor):
        raise TypeError(f"{source}: the reader gave no affine")
    affine = image.affine
    if image.shape[0] in (3, 4) and image.dim() == 3:  # greyscale as RGB(A), as sites read it
        image = image[:3].mean(dim=0, keepdim=True)
    if normalisation_for(modality) == "ct-window":
        level, width = (float(v) for v in metadata["ct_window_hu"])
        scale: Any = mt.ScaleIntensityRange(
            level - width / 2, level + width / 2, 0.0, 1.0, clip=True
        )
    else:
        scale = mt.ScaleIntensityRangePercentiles(*PERCENTILES, 0.0, 1.0, clip=True)
    scaled = scale(image.float())
    return scaled if isinstance(scaled, MetaTensor) else MetaTensor(scaled, affine=affine)


def write_overlay(
    path: Path,
    image: MetaTensor,
    *,
    labels: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    box_texts: Sequence[str] = (),
    heat: np.ndarray | None = None,
    caption: str = "",
) -> Path:
    """Draw ``image`` (``windowed_image``) with ``labels`` (a label map on its grid, 0
    background), ``boxes`` (``(k, 2 * dims)`` half-open on its grid, each with a text),
    ``heat`` (values in [0, 1] on its grid) and ``caption``; write the PNG to ``path``."""
    from PIL import Image, ImageDraw

    plane, label_plane, heat_plane, shown = _display_plane(image, labels, boxes, heat)
    zoom = max(1, -(-MIN_SIDE_PX // max(plane.shape)))
    grey = np.repeat((np.clip(plane, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    rgb = grey.astype(np.float64)
    if heat_plane is not None:
        import matplotlib

        colours = matplotlib.colormaps["jet"](np.clip(heat_plane, 0, 1))[..., :3] * 255
        rgb = 0.55 * rgb + 0.45 * colours
    if label_plane is not None:
        for value in (v for v in np.unique(label_plane) if v > 0):
            region = label_plane == value
            tint = np.asarray(_COLOURS[(int(value) - 1) % len(_COLOURS)], dtype=np.float64)
            rgb[region] = 0.6 * rgb[region] + 0.4 * tint
            rgb[region & ~_eroded(region)] = tint
    picture = Image.fromarray(rgb.round().astype(np.uint8)).resize(
        (plane.shape[1] * zoom, plane.shape[0] * zoom), Image.Resampling.NEAREST
    )
    draw = ImageDraw.Draw(picture)
    for index, box in shown.items():
        x0, y0, x1, y1 = (float(v) * zoom for v in box)
        text = box_texts[index] if index < len(box_texts) else ""
        colour = _COLOURS[index % len(_COLOURS)]
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=2)
        draw.text((x0 + 2, max(y0 - 12, 0)), text, fill=colour)
    if caption:
        draw.rectangle((0, 0, picture.width, 14), fill=(0, 0, 0))
        draw.text((3, 1), caption, fill=(255, 255, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def write_heat_map(
    path: Path,
    source: Path,
    modality: str,
    metadata: Mapping[str, Any],
    heat: np.ndarray,
    caption: str = "",
) -> Path:
    """A heat map on the network's grid (``(image_size,) * dims``, e.g. Grad-CAM, scaled here
    to [0, 1]) drawn over the input ``source`` on its own grid: resized back linearly and,
    for volumes, reoriented from RAS to the input's axes, as masks are."""
    image = windowed_image(source, modality, metadata)
    heat = np.asarray(heat, dtype=np.float32)
    span = float(heat.max() - heat.min())
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    spatial = image.shape[1:]
    if heat.ndim == 3:
        oriented: Any = mt.Orientation(axcodes="RAS", labels=None)(image)
        resized = mt.Resize(oriented.shape[1:], mode="trilinear")(torch.from_numpy(heat)[None])
        back = mt.Orientation(axcodes=_axcodes(image.affine), labels=None)(
            MetaTensor(torch.as_tensor(np.asarray(resized)), affine=oriented.affine)
        )
        native = np.asarray(back[0])
    else:
        native = np.asarray(mt.Resize(spatial, mode="bilinear")(torch.from_numpy(heat)[None])[0])
    return write_overlay(path, image, heat=native, caption=caption)


def _axcodes(affine: Any) -> str:
    import nibabel as nib

    return "".join(nib.aff2axcodes(np.asarray(affine)))


def _eroded(region: np.ndarray) -> np.ndarray:
    """``region`` without its outline (4-neighbour erosion)."""
    inner = region.copy()
    inner[1:] &= region[:-1]
    inner[:-1] &= region[1:]
    inner[:, 1:] &= region[:, :-1]
    inner[:, :-1] &= region[:, 1:]
    return inner


def _display_plane(
    image: MetaTensor,
    labels: np.ndarray | None,
    boxes: np.ndarray | None,
    heat: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, dict[int, np.ndarray]]:
    """The picture's plane ``(rows, columns)`` of the image, labels and heat, and the boxes
    it crosses, by their index, as ``(x0, y0, x1, y1)`` in its pixels."""
    boxes = np.zeros((0, 2 * (image.dim() - 1))) if boxes is None else np.asarray(boxes)
    if image.dim() == 3:  # (1, *2D): drawn as stored, the transpose of MONAI's axes
        return (
            np.asarray(image[0]).T,
            None if labels is None else np.asarray(labels).T,
            None if heat is None else np.asarray(heat).T,
            dict(enumerate(boxes[:, :4])),
        )
    from client.predict_boxes import map_boxes

    affine = np.asarray(image.affine, dtype=np.float64)
    stack = [torch.as_tensor(np.asarray(image[0]), dtype=torch.float32)]
    for extra in (labels, heat):
        if extra is not None:
            stack.append(torch.as_tensor(np.asarray(extra), dtype=torch.float32))
    lps: Any = mt.Orientation(axcodes="LPS", labels=None)(
        MetaTensor(torch.stack(stack), affine=torch.as_tensor(affine))
    )
    arrays = [np.asarray(channel) for channel in lps]
    volume = arrays.pop(0)
    label_volume = arrays.pop(0) if labels is not None else None
    heat_volume = arrays.pop(0) if heat is not None else None
    on_lps = map_boxes(boxes, affine, np.asarray(lps.affine, dtype=np.float64))
    z = _slice(volume, label_volume, on_lps, heat_volume)
    crossing = {
        index: box[[0, 1, 3, 4]]
        for index, box in enumerate(on_lps)
        if box[2] < z + 1 and box[5] > z
    }
    return (
        volume[:, :, z].T,
        None if label_volume is None else label_volume[:, :, z].round().astype(np.int64).T,
        None if heat_volume is None else heat_volume[:, :, z].T,
        crossing,
    )


def _slice(
    volume: np.ndarray, labels: np.ndarray | None, boxes: np.ndarray, heat: np.ndarray | None
) -> int:
    if labels is not None and (labels > 0).any():
        return int(np.argmax((labels > 0).sum(axis=(0, 1))))
    if len(boxes):
        return int(np.clip((boxes[0, 2] + boxes[0, 5]) // 2, 0, volume.shape[2] - 1))
    if heat is not None:
        return int(np.argmax(heat.max(axis=(0, 1))))
    return volume.shape[2] // 2
