"""``radfl predict``: the federated model on new studies at a site, preprocessed as in training.

The model (an MLflow run id, ``models:/NAME/VERSION``, ``runs:/...`` or a local model folder)
carries in its ``MLmodel`` metadata everything needed (``server.tracking.model_metadata``):
the task, image size and dimensions, the CT window and percentile scaling, the class names,
the operating threshold chosen on pooled validation and a calibration temperature. Each input
(a DICOM file or series folder, NIfTI, PNG/JPEG, NumPy, or a site folder or its
``manifest.csv``) goes through the site's own preprocessing (``client.preprocessing``), so the
numbers match the final evaluation's. An input that cannot be read or predicted is reported
by name and skipped; the exit code is 1 when any failed.

Outputs in ``--out``: ``predictions.csv`` (classification: one probability column per class,
the thresholded label, the predictive entropy of the calibrated probabilities and
``referral_entropy``, the report's selective-prediction entropy: ``common.selective``),
``masks/<name>.nii.gz`` (segmentation: the label map on the input's own grid and affine),
``seg/<name>.dcm`` (segmentation of a single-frame DICOM file: DICOM SEG, one segment per
non-background class), ``gradcam/<name>.png`` (classification with ``--gradcam``: the
Grad-CAM map of the predicted class over the preprocessed image, ``common.attention``; it
stays in ``--out``, at the site) and ``failed.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.progress import track

from client import data, predict_outputs
from client.preprocessing import image_transforms
from common import manifest as mf
from common.errors import ConfigError, SiteDataError

#: The ``MLmodel`` metadata key and the version ``server.tracking.model_metadata`` writes.
METADATA_KEY = "radfl"
METADATA_VERSION = 1
#: Tasks ``radfl predict`` writes outputs for.
SUPPORTED_TASKS = ("classification", "segmentation")
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_IMAGE_SUFFIXES = mf.IMAGE_SUFFIXES


@dataclass(frozen=True)
class LoadedModel:
    """A logged model ready to run: its network (eval mode, CPU) and its metadata."""

    network: Any
    metadata: Mapping[str, Any]
    source: str

    @property
    def task(self) -> str:
        return str(self.metadata["task"])

    @property
    def temperature(self) -> float:
        return float(self.metadata.get("temperature") or 1.0)


@dataclass(frozen=True)
class Study:
    """One input to predict: its path, the name it is reported by, its DICOM modality."""

    path: Path
    name: str
    modality: str = ""

    @property
    def is_dicom(self) -> bool:
        return data.is_dicom_path(self.path)


def model_uri(source: str) -> str:
    """The MLflow URI of ``source``: a local folder as is, a bare run id as its
    ``final-model``, and ``models:/``/``runs:/`` URIs unchanged."""
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser().resolve())
    if _RUN_ID.fullmatch(source):
        return f"runs:/{source}/final-model"
    if source.startswith(("models:/", "runs:/")):
        return source
    raise ConfigError(
        f"model {source!r} is neither a folder, a run id nor a models:/ or runs:/ URI"
    )


def read_metadata(source: str, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The model's RadFL metadata, checked; a model logged without it is refused by name."""
    found = (metadata or {}).get(METADATA_KEY)
    if not isinstance(found, Mapping):
        raise ConfigError(
            f"model {source} carries no '{METADATA_KEY}' metadata (logged by a RadFL older than "
            "radfl predict): re-run the federation, or load its weights/ artifacts by hand"
        )
    if found.get("version") != METADATA_VERSION:
        raise ConfigError(
            f"model {source}: metadata version {found.get('version')!r} is not the "
            f"{METADATA_VERSION} this RadFL reads"
        )
    missing = [
        k
        for k in ("task", "spatial_dims", "image_size", "num_classes", "ct_window_hu")
        if k not in found
    ]
    if missing:
        raise ConfigError(f"model {source}: metadata lacks {', '.join(missing)}")
    if found["task"] not in SUPPORTED_TASKS:
        raise ConfigError(
            f"model {source}: task {found['task']!r}; radfl predict writes outputs for "
            f"{', '.join(SUPPORTED_TASKS)}"
        )
    return dict(found)


def load_model(source: str) -> LoadedModel:
    """The logged model ``source`` (see :func:`model_uri`) and its metadata."""
    import mlflow

    uri = model_uri(source)
    try:
        local = Path(mlflow.artifacts.download_artifacts(uri))
        metadata = mlflow.models.Model.load(str(local / "MLmodel")).metadata
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        raise ConfigError(f"model {source}: cannot load {uri}: {exc}") from exc
    checked = read_metadata(source, metadata)
    network = mlflow.pytorch.load_model(str(local), map_location="cpu")
    # An exported (pt2) program was exported in eval mode and may refuse ``.eval()``.
    with contextlib.suppress(NotImplementedError):
        network.eval()
    return LoadedModel(network, checked, source)


def collect_studies(paths: Sequence[Path], task: str) -> tuple[list[Study], list[tuple[str, str]]]:
    """The studies named by ``paths`` (files, DICOM series folders, site folders or their
    ``manifest.csv``) and ``(name, reason)`` for each that cannot be one."""
    studies: list[Study] = []
    failed: list[tuple[str, str]] = []
    for path in paths:
        name = str(path)
        try:
            if path.name == mf.MANIFEST_NAME or (path / mf.MANIFEST_NAME).is_file():
                studies += _site_studies(path.parent if path.is_file() else path, task)
            elif not path.exists():
                failed.append((name, "no such file or folder"))
            elif path.is_dir() and not data.series_files(path):
                failed.append((name, "a folder without DICOM files or manifest.csv"))
            elif path.is_file() and not path.name.lower().endswith(_IMAGE_SUFFIXES):
                failed.append((name, f"not an image file ({', '.join(_IMAGE_SUFFIXES)})"))
            else:
                studies.append(Study(path, name, _modality(path)))
        except (SiteDataError, OSError, ValueError) as exc:
            failed.append((name, f"{type(exc).__name__}: {exc}"))
    return studies, failed


def _site_studies(root: Path, task: str) -> list[Study]:
    rows = data.fill_subgroups_from_dicom(data.read_manifest(root, task), root)
    return [
        Study(data.resolve_path(root, row[mf.IMAGE]), row[mf.IMAGE], str(row[mf.MODALITY]))
        for _, row in rows.iterrows()
    ]


def _modality(path: Path) -> str:
    if not data.is_dicom_path(path):
        return ""
    try:
        return str(getattr(data.read_dicom_header(path), "Modality", "") or "")
    except Exception:  # noqa: BLE001 - an unreadable header fails later, by name, at decoding
        return ""


def preprocess(study: Study, metadata: Mapping[str, Any]) -> torch.Tensor:
    """The study as the network takes it, ``(1, 1, *spatial)``, by the site's preprocessing."""
    pipeline = image_transforms(
        int(metadata["spatial_dims"]),
        int(metadata["image_size"]),
        study.modality or None,
        ct_window_hu=tuple(metadata["ct_window_hu"]),  # type: ignore[arg-type]
        spacing_mm=metadata.get("spacing_mm"),
    )
    image = torch.as_tensor(pipeline({"image": str(study.path)})["image"], dtype=torch.float32)
    expected = (1,) + (int(metadata["image_size"]),) * int(metadata["spatial_dims"])
    if tuple(image.shape) != expected:
        raise SiteDataError(f"{study.name}: preprocessed to {tuple(image.shape)}, not {expected}")
    return image.unsqueeze(0)


def calibrated_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax of ``logits / temperature`` over the class axis (as the evaluation's, at T=1)."""
    return torch.softmax(logits.float() / temperature, dim=1)


def entropy(probabilities: np.ndarray) -> float:
    """Predictive entropy in nats."""
    p = probabilities[probabilities > 0]
    return float(-(p * np.log(p)).sum())


def classification_row(model: LoadedModel, probabilities: np.ndarray) -> dict[str, Any]:
    """Probabilities, the thresholded label and the uncertainty of one study."""
    names = list(model.metadata.get("class_names") or range(len(probabilities)))
    row: dict[str, Any] = {f"p_{n}": float(p) for n, p in zip(names, probabilities, strict=True)}
    threshold = model.metadata.get("threshold")
    if len(probabilities) == 2 and threshold is not None and math.isfinite(float(threshold)):
        label = int(probabilities[1] >= float(threshold))
    else:
        label = int(np.argmax(probabilities))
    row["label"] = names[label]
    row["uncertainty"] = entropy(probabilities)
    return row


def predict_study(
    model: LoadedModel, study: Study, out: Path, *, gradcam: bool = False
) -> dict[str, Any]:
    """Predict one study; its CSV row (its mask is written under ``out/masks``, its Grad-CAM
    overlay under ``out/gradcam`` with ``gradcam``)."""
    image = preprocess(study, model.metadata)
    with torch.no_grad():
        output = model.network(image)
    if model.task == "classification":
        probabilities = calibrated_probabilities(output, model.temperature)[0].numpy()
        result = classification_row(model, probabilities)
        result["referral_entropy"] = referral_entropy(model, image)
        if gradcam:
            path = out / "gradcam" / f"{_safe_stem(study.name)}.png"
            write_gradcam(model, image, path)
            result["gradcam"] = str(path)
        return result
    mask = torch.argmax(output.float(), dim=1)[0].numpy().astype(np.uint8)
    native, affine = predict_outputs.native_mask(mask, study.path)
    stem = _safe_stem(study.name)
    nifti = out / "masks" / f"{stem}.nii.gz"
    predict_outputs.write_nifti(native, affine, nifti)
    row: dict[str, Any] = {"mask": str(nifti), "foreground_voxels": int((native > 0).sum())}
    if study.is_dicom and study.path.is_file():
        seg = out / "seg" / f"{stem}.dcm"
        names = [
            str(n)
            for n in model.metadata.get("class_names") or range(int(model.metadata["num_classes"]))
        ]
        predict_outputs.write_dicom_seg(native, study.path, seg, names)
        row["dicom_seg"] = str(seg)
    return row


def referral_entropy(model: LoadedModel, image: torch.Tensor) -> float:
    """The normalised predictive entropy (0 to 1) of the model's ``uncertainty`` method at
    T = 1, as each site computed it for the report's selective-prediction curve: a study
    above the report's cut-off for a referred share is one the report counted as referred.
    (MC dropout samples the head of a plain network: an exported program cannot.)"""
    from common import selective, uncertainty

    method = str(model.metadata.get("uncertainty") or "entropy")
    if method not in uncertainty.METHODS:
        raise ConfigError(f"model {model.source}: unknown uncertainty method {method!r}")
    with torch.no_grad():
        _, sampled = uncertainty.predictive_probabilities(
            _explained_network(model),
            image,
            method,  # type: ignore[arg-type]
        )
    return float(selective.normalised_entropy(sampled)[0])


def write_gradcam(model: LoadedModel, image: torch.Tensor, path: Path) -> None:
    """The Grad-CAM map of the predicted class over the preprocessed image, as a PNG (the
    middle slice of a volume)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.attention import grad_cam

    cam = grad_cam(_explained_network(model), image)[0, 0].numpy()
    picture = image[0, 0].numpy()
    if picture.ndim == 3:
        middle = picture.shape[2] // 2
        picture, cam = picture[:, :, middle], cam[:, :, middle]
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(picture.T, cmap="gray", origin="lower")
    ax.imshow(cam.T, cmap="jet", alpha=0.4, origin="lower")
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


_EXPLAINED: dict[int, Any] = {}


def _explained_network(model: LoadedModel) -> Any:
    """The model as a plain network of its registered architecture (Grad-CAM hooks its
    layers by name; an exported program has none), with the logged weights."""
    key = id(model)
    if key not in _EXPLAINED:
        from common.tasks import get_task
        from common.tasks.base import ModelConfig

        found = model.metadata
        config = ModelConfig(
            task=str(found["task"]),
            model=str(found["model"]),
            spatial_dims=int(found["spatial_dims"]),
            image_size=int(found["image_size"]),
            num_classes=int(found["num_classes"]),
            seed=0,
        )
        network = get_task(config).build_model()
        network.load_state_dict(model.network.state_dict())
        _EXPLAINED[key] = network.eval()
    return _EXPLAINED[key]


def _safe_stem(name: str) -> str:
    stem = re.sub(r"(\.nii\.gz|\.[A-Za-z0-9]+)$", "", name.rstrip("/"))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_") or "study"


def predict(
    model: LoadedModel,
    studies: Sequence[Study],
    out: Path,
    *,
    progress: bool = True,
    gradcam: bool = False,
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Predict every study; the table of results and ``(name, reason)`` of each failure."""
    rows: list[dict[str, Any]] = []
    failed: list[tuple[str, str]] = []
    # rich draws the progress on stderr, as radfl site check does.
    console = Console(stderr=True)
    for study in track(studies, "predicting", console=console, disable=not progress):
        try:
            row = predict_study(model, study, out, gradcam=gradcam)
        except Exception as exc:  # noqa: BLE001 - one bad study must not stop the others
            cause = data.transform_error_cause(exc)
            # The first line: MONAI appends every reader's traceback to its message.
            reason = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}"
            failed.append((study.name, reason))
            console.print(f"radfl predict: skipped {study.name}: {reason}", markup=False)
        else:
            rows.append({"input": study.name, "modality": study.modality, **row})
    return pd.DataFrame(rows), failed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="run id, models:/NAME/VERSION, runs:/... or model folder")
    parser.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        help="DICOM files or series folders, NIfTI, PNG/JPEG, .npy, site folders or manifests",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the outputs")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument(
        "--gradcam",
        action="store_true",
        help="classification: also write a Grad-CAM overlay PNG per study under OUT/gradcam",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    model = load_model(str(args.model))
    studies, failed = collect_studies(list(args.inputs), model.task)
    for name, reason in failed:
        print(f"radfl predict: skipped {name}: {reason}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table, failed_now = predict(
        model, studies, out, progress=not args.quiet, gradcam=bool(args.gradcam)
    )
    failed += failed_now
    table.to_csv(out / "predictions.csv", index=False)
    pd.DataFrame(failed, columns=["input", "reason"]).to_csv(out / "failed.csv", index=False)
    print(f"radfl predict: {len(table)} predicted, {len(failed)} failed; outputs in {out}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``radfl predict`` without the dispatcher (``python -m client.predict``)."""
    parser = argparse.ArgumentParser(prog="radfl predict")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"radfl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
