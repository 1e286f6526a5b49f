"""Prediction-against-truth overlays on synthetic validation images, in simulation only.

A real federation never moves an image: the coordinator sees metric states only. In a local
simulation every site is synthetic and on this machine, so ``radfl simulate`` can show what the
final segmentation model does: it reloads the evaluated model from the MLflow run, predicts a
few validation images of each synthetic site through the same loader the sites used, and logs
``report/overlays.png`` (truth in green, prediction in red, per-image Dice) to the run.
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
from mlflow.tracking import MlflowClient  # noqa: E402

from client.site import load_site  # noqa: E402
from common.config import ClientConfig, ServerConfig  # noqa: E402
from common.tasks import SegmentationTask, get_task  # noqa: E402
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
    if not isinstance(task, SegmentationTask):
        return None
    client = MlflowClient(tracking.tracking_uri())
    model = task.build_model()
    model.load_state_dict(_evaluated_weights(client, run_id, server_config.final_model))
    model.eval()
    panels = []
    for index in range(sites):
        node_config: dict[str, Any] = (
            {"data-path": str(data_root / f"site-{index}")}
            if data_root is not None
            else {"partition-id": index, "num-partitions": sites}
        )
        site = load_site(node_config, client_config)
        chosen = [i for i in range(len(site.validation)) if int(site.validation.labels[i]) > 0]
        for i in chosen[:per_site]:
            sample = site.validation[i]
            batch = {
                "image": sample["image"][None],
                "label": torch.as_tensor(sample["label"])[None],
            }
            with torch.no_grad():
                probs, target = task.predict(model, batch)
            predicted = probs.argmax(1)[0].numpy()
            truth = target[0, 0].numpy()
            panels.append((site.name, sample["image"][0].numpy(), truth, predicted))
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


def _draw(panels: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: Path) -> None:
    columns = min(4, len(panels))
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (site, image, truth, predicted) in zip(axes.flat, panels, strict=False):
        if image.ndim == 3:  # a volume: the slice holding most of the lesion
            z = int(np.argmax((truth > 0).sum(axis=(0, 1))))
            image, truth, predicted = image[..., z], truth[..., z], predicted[..., z]
        ax.imshow(image.T, cmap="gray", origin="lower")
        if truth.any():
            ax.contour(truth.T > 0, levels=[0.5], colors="lime", linewidths=1)
        if predicted.any():
            ax.contour(predicted.T > 0, levels=[0.5], colors="red", linewidths=1)
        overlap = np.logical_and(truth > 0, predicted > 0).sum()
        size = (truth > 0).sum() + (predicted > 0).sum()
        dice = 2 * overlap / size if size else float("nan")
        ax.set_title(f"{site}: Dice {dice:.2f}", fontsize=8)
    fig.suptitle("Validation images: truth (green), prediction (red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
