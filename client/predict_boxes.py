"""What ``radfl predict`` writes for detection and instance segmentation: each input's boxes as
JSON (class, score, box in the input's voxels and, where the input has a patient geometry, in
world millimetres) and, for instance segmentation, its instance map as NIfTI.

The network finds boxes on its training grid through the task's own ``predict`` (the
detector, its score threshold, non-maximum suppression and, for instances, the masks), as
the final evaluation does. A box is half-open, ``(lo..., hi...)``, in continuous voxel
coordinates where voxel ``i`` spans ``[i, i + 1)`` (``common.tasks.instance.mask_boxes``);
scaling a box by the resize factor is then exact. To reach the input's own voxels the box is
scaled from the training grid to the decoded grid (for volumes: the grid reoriented to RAS,
as in ``client.preprocessing``) and its two corners are taken through the affines to the
input's own axes (flips and axis swaps of the reorientation included).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from client import data
from client.preprocessing import decode_image
from common.errors import SiteDataError
from common.tasks.base import ModelConfig, Task, get_task

#: The world frame of ``box_world_mm``: MONAI's readers give affines to RAS millimetres (for
#: DICOM, patient LPS with x and y negated).
WORLD_FRAME = "RAS"


@dataclass(frozen=True)
class InputGrid:
    """The input's own voxel grid and the grid its preprocessing resized from."""

    shape: tuple[int, ...]
    affine: np.ndarray
    #: The decoded grid before resizing (volumes: reoriented to RAS) and its affine.
    model_shape: tuple[int, ...]
    model_affine: np.ndarray
    #: Whether the affine is a patient geometry (DICOM with a position, NIfTI), not identity.
    has_world: bool


def task_of(metadata: Mapping[str, Any]) -> Task:
    """The task the model was trained for, bound to its network configuration."""
    return get_task(ModelConfig.of_model(metadata))


def detect(task: Task, network: torch.nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """The task's prediction for one preprocessed image ``(1, 1, *spatial)``: ``boxes``,
    ``labels`` (object classes from 0), ``scores`` and, for instances, ``masks``."""
    predictions, _ = task.predict(network, {"image": image, "label": [{}]})  # type: ignore[dict-item]
    return dict(predictions[0])


def score_threshold(task: Task, network: torch.nn.Module) -> float:
    """The score below which the model's detector drops a box."""
    return float(task.detector(network).box_selector.score_thresh)  # type: ignore[attr-defined]


def input_grid(source: Path, spatial_dims: int) -> InputGrid:
    """The grid of the image at ``source`` as the site's readers decode it."""
    image = decode_image(source)
    if not isinstance(image, MetaTensor):
        raise SiteDataError(f"{source}: the reader gave no affine")
    affine = np.asarray(image.affine, dtype=np.float64)
    model: Any = image
    if spatial_dims == 3:
        model = mt.Orientation(axcodes="RAS", labels=None)(image)
        if not isinstance(model, MetaTensor):
            raise SiteDataError(f"{source}: reorientation lost the affine")
    return InputGrid(
        shape=tuple(int(s) for s in image.shape[1 : 1 + spatial_dims]),
        affine=affine,
        model_shape=tuple(int(s) for s in model.shape[1 : 1 + spatial_dims]),
        model_affine=np.asarray(model.affine, dtype=np.float64),
        has_world=_has_patient_geometry(source),
    )


def _has_patient_geometry(source: Path) -> bool:
    name = source.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return True
    if not data.is_dicom_path(source):
        return False  # PNG/JPEG and NumPy arrays: identity affine, no patient space
    # MONAI's reader takes the geometry from these (an enhanced multi-frame file keeps it per
    # frame, which the reader does not read: its affine is the identity).
    header = data.read_dicom_header(source)
    return "ImagePositionPatient" in header and "ImageOrientationPatient" in header


def _to_world(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Continuous voxel coordinates ``(n, d)`` (voxel ``i`` spans ``[i, i + 1)``; affines
    index voxel centres) to world millimetres."""
    dims, spatial = points.shape[1], affine.shape[0] - 1
    index = np.zeros((len(points), spatial + 1))
    index[:, :dims] = points - 0.5
    index[:, spatial] = 1.0
    return (affine @ index.T).T[:, :spatial]


def _from_world(world: np.ndarray, affine: np.ndarray, dims: int | None = None) -> np.ndarray:
    spatial = affine.shape[0] - 1
    padded = np.concatenate([world, np.ones((len(world), 1))], axis=1)
    index = (np.linalg.inv(affine) @ padded.T).T[:, :spatial]
    return index[:, : dims or spatial] + 0.5


def native_boxes(boxes: np.ndarray, grid: InputGrid, image_size: int) -> np.ndarray:
    """Boxes ``(k, 2 * dims)`` on the training grid as half-open boxes on the input's grid."""
    dims = len(grid.shape)
    if len(boxes) == 0:
        return np.zeros((0, 2 * dims))
    scale = np.asarray(grid.model_shape, dtype=np.float64) / image_size
    on_model = np.asarray(boxes, dtype=np.float64) * np.tile(scale, 2)
    return map_boxes(on_model, grid.model_affine, grid.affine)


def map_boxes(boxes: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Half-open boxes ``(k, 2 * dims)`` on the grid of affine ``source`` as half-open boxes
    on the grid of affine ``target`` (the same space: a reorientation's flips and swaps)."""
    dims = boxes.shape[1] // 2
    if len(boxes) == 0:
        return np.zeros((0, 2 * dims))
    corners = np.asarray(boxes, dtype=np.float64).reshape(-1, dims)  # lo, hi alternating
    mapped = _from_world(_to_world(corners, source), target, dims)
    lo, hi = mapped[0::2], mapped[1::2]
    return np.concatenate([np.minimum(lo, hi), np.maximum(lo, hi)], axis=1)


def world_corners(boxes: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The two opposite corners ``(k, 2, 3)`` of each native box in world millimetres."""
    dims, spatial = boxes.shape[1] // 2, affine.shape[0] - 1
    corners = boxes.reshape(-1, dims)
    return _to_world(corners, affine).reshape(len(boxes), 2, spatial)


def ranked(prediction: Mapping[str, torch.Tensor]) -> list[int]:
    """Box indices by descending score: a box's instance number is its rank plus one."""
    scores = prediction["scores"].detach().cpu().numpy()
    return [int(i) for i in np.argsort(-scores, kind="stable")]


def instance_map(prediction: Mapping[str, torch.Tensor], order: Sequence[int]) -> np.ndarray:
    """The instance masks as one map on the training grid: instance ``n`` (the ``n``-th box
    by score) numbers its voxels; where masks overlap, the higher score wins."""
    masks = prediction["masks"].detach().cpu().numpy().astype(bool)
    out = np.zeros(masks.shape[1:], dtype=np.uint8)
    for number in range(len(order), 0, -1):  # lowest score first, overwritten by higher
        out[masks[order[number - 1]]] = number
    return out


def boxes_document(
    name: str,
    prediction: Mapping[str, torch.Tensor],
    order: Sequence[int],
    boxes: np.ndarray,
    grid: InputGrid,
    *,
    class_names: Sequence[str],
    threshold: float,
    instance_voxels: np.ndarray | None = None,
) -> dict[str, Any]:
    """The JSON of one input: its boxes by descending score, in voxels and world mm."""
    labels = prediction["labels"].detach().cpu().numpy()
    scores = prediction["scores"].detach().cpu().numpy()
    world = world_corners(boxes, grid.affine) if grid.has_world else None
    found = []
    for number, index in enumerate(order, 1):
        box: dict[str, Any] = {
            "instance": number,
            # Object class c is the model's class c + 1 (class 0 is "no finding").
            "class": str(class_names[int(labels[index]) + 1]),
            "score": round(float(scores[index]), 6),
            "box_voxel": [round(float(v), 3) for v in boxes[index]],
            "box_world_mm": None
            if world is None
            else [[round(float(v), 3) for v in corner] for corner in world[index]],
        }
        if instance_voxels is not None:
            box["voxels"] = int(instance_voxels[number])
        found.append(box)
    return {
        "input": name,
        "score_threshold": threshold,
        "voxel_axes": "the input's array axes as read (DICOM: column, row, slice)",
        "world_frame": WORLD_FRAME if grid.has_world else None,
        "shape": list(grid.shape),
        "boxes": found,
    }


def write_json(document: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2))
