"""Prediction-against-truth overlays on synthetic validation images, in simulation only.

A real federation never moves an image: the coordinator sees metric states only. In a local
simulation every site is synthetic and on this machine, so ``radfl simulate`` can show what the
final segmentation, detection or instance model does: it reloads the evaluated model from the
MLflow run, predicts a few validation images of each synthetic site through the same loader
the sites used, and logs ``report/overlays.png`` (truth in green, prediction in red: contours
of masks, rectangles of boxes scoring at least 0.3, per-image Dice of the masks) to the run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from client.site import load_site  # noqa: E402
from common.config import ClientConfig, ServerConfig  # noqa: E402
from common.errors import RadFLError  # noqa: E402
from common.privacy import private_model  # noqa: E402
from common.tasks import Overlay, Task, get_task  # noqa: E402
from server import tracking  # noqa: E402

ARTIFACT = "report/overlays.png"


def log_overlays(
    run_id: str,
    server_config: ServerConfig,
    client_config: ClientConfig,
    sites: int,
    data_root: Path | None,
    per_site: int = 2,
) -> str | None:
    """Log overlays of the run's evaluated model; the artifact path, or None for tasks without
    masks."""
    task = get_task(client_config.model_config)
    if type(task).overlay is Task.overlay:  # the task draws nothing
        return None
    client = MlflowClient(tracking.tracking_uri())
    model = task.build_model()
    if client_config.private_network:  # the sites' DP network: GroupNorm for BatchNorm
        model = private_model(model)
    model.load_state_dict(_evaluated_weights(client, run_id, server_config.final_model))
    model.eval()
    panels = []
    for index in range(sites):
        node_config: dict[str, Any] = (
            {"data-path": str(data_root / f"site-{index}")}
            if data_root is not None
            else {"partition-id": index, "num-partitions": sites}
        )
        try:
            site = load_site(node_config, client_config)
        except RadFLError:
            # The run already left this site out and said why; its error text may name
            # patients or files, so it is not repeated here.
            print(f"radfl: no overlay of site-{index}: its data did not load (see its log)")
            continue
        chosen = [i for i in range(len(site.validation)) if int(site.validation.labels[i]) > 0]
        for i in chosen[:per_site]:
            sample = site.validation[i]
            overlay = task.overlay(model, sample)
            if overlay is not None:
                panels.append((site.name, sample["image"][0].numpy(), overlay))
    if not panels:
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "overlays.png"
        _draw(panels, path)
        client.log_artifact(run_id, str(path), artifact_path="report")
    return ARTIFACT


def _evaluated_weights(client: MlflowClient, run_id: str, final_model: str) -> dict[str, Any]:
    names = ["best.pt", "final.pt"] if final_model == "best" else ["final.pt"]
    available = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "weights")}
    name = next(n for n in names if n in available)
    with tempfile.TemporaryDirectory() as folder:
        path = client.download_artifacts(run_id, f"weights/{name}", folder)
        return dict(torch.load(path, weights_only=True))


def _draw(panels: list[tuple[str, np.ndarray, Overlay]], path: Path) -> None:
    columns = min(4, len(panels))
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (site, image, overlay) in zip(axes.flat, panels, strict=False):
        truth, predicted = overlay.truth, overlay.predicted
        truth_boxes, predicted_boxes = overlay.truth_boxes, overlay.predicted_boxes
        if image.ndim == 3:  # a volume: the slice holding most of the lesion
            z = _lesion_slice(truth, truth_boxes)
            image, truth, predicted = image[..., z], truth[..., z], predicted[..., z]
            truth_boxes, predicted_boxes = _boxes_at(truth_boxes, z), _boxes_at(predicted_boxes, z)
        ax.imshow(image.T, cmap="gray", origin="lower")
        if truth.any():
            ax.contour(truth.T > 0, levels=[0.5], colors="lime", linewidths=1)
        if predicted.any():
            ax.contour(predicted.T > 0, levels=[0.5], colors="red", linewidths=1)
        for boxes, colour in ((truth_boxes, "lime"), (predicted_boxes, "red")):
            for x0, y0, x1, y1 in boxes[:, :4]:
                ax.add_patch(
                    Rectangle(
                        (x0 - 0.5, y0 - 0.5),
                        x1 - x0,
                        y1 - y0,
                        fill=False,
                        ec=colour,
                        lw=0.8,
                        ls="--",
                    )
                )
        overlap = np.logical_and(truth > 0, predicted > 0).sum()
        size = (truth > 0).sum() + (predicted > 0).sum()
        dice = f"Dice {2 * overlap / size:.2f}" if size else ""
        counts = f"boxes {len(truth_boxes)} true, {len(predicted_boxes)} found"
        ax.set_title(f"{site}: {dice if truth.any() else counts}", fontsize=8)
    fig.suptitle("Validation images: truth (green), prediction (red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _lesion_slice(truth: np.ndarray, boxes: np.ndarray) -> int:
    """The axial slice holding most of the lesion voxels, else the first box's middle."""
    if truth.any():
        return int(np.argmax((truth > 0).sum(axis=(0, 1))))
    if len(boxes):
        return int((boxes[0, 2] + boxes[0, 5]) // 2)
    return truth.shape[-1] // 2


def _boxes_at(boxes: np.ndarray, z: int) -> np.ndarray:
    """The in-plane corners of the 3D boxes that cross slice ``z``."""
    crossing = (boxes[:, 2] <= z) & (boxes[:, 5] > z)
    return boxes[crossing][:, [0, 1, 3, 4]]
