"""``radfl predict``: the federated model on new studies at a site, preprocessed as in training.

The model (an MLflow run id, ``models:/NAME/VERSION``, ``runs:/...`` or a local model folder)
carries in its ``MLmodel`` metadata everything needed (``server.tracking.model_metadata``):
the task, image size and dimensions, the CT window and percentile scaling, the class names,
the operating threshold chosen on pooled validation and a calibration temperature. Each input
(a DICOM file or series folder, NIfTI, PNG/JPEG, NumPy, or a site folder or its
``manifest.csv``) goes through the site's own preprocessing (``client.preprocessing``), so the
numbers match the final evaluation's. An input that cannot be read or predicted is reported
by name and skipped; the exit code is 1 when any failed.

Outputs in ``--out``:

- ``predictions.csv``: one row per input; classification: one probability column per class,
  the thresholded label, the predictive entropy of the calibrated probabilities and
  ``referral_entropy``, the report's selective-prediction entropy (``common.selective``);
- ``masks/<name>.nii.gz``: segmentation (the label map) and instance segmentation (the
  instance map), on the input's own grid and affine;
- ``seg/<name>.dcm``: segmentation of a DICOM file, multi-frame file or series folder as DICOM
  SEG, one segment per non-background class, one frame per source frame or slice;
- ``boxes/<name>.json``: detection and instance segmentation: each box's class, score and
  corners in the input's voxels and in world millimetres (``client.predict_boxes``);
- ``overlays/<name>.png`` (``--overlays``): the prediction drawn on the input
  (``client.predict_overlays``);
- ``gradcam/<name>.png`` (classification with ``--gradcam``): the Grad-CAM map of the
  predicted class over the preprocessed image (``common.attention``); it stays in ``--out``,
  at the site;
- ``failed.csv``: each input that failed, with the reason.
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

from client import data, predict_boxes, predict_explain, predict_outputs, predict_overlays
from client.preprocessing import image_transforms
from common import ensemble
from common import manifest as mf
from common.errors import ConfigError, SiteDataError

#: The ``MLmodel`` metadata key and the version ``server.tracking.model_metadata`` writes.
METADATA_KEY = "radfl"
METADATA_VERSION = 2
#: Why a model of an older version is refused (``server.tracking.MODEL_METADATA_VERSION``).
_OLDER_VERSIONS = {
    1: "trained before images were z-scored per image after the intensity window, so this "
    "RadFL would give it other inputs than it learnt from",
}
#: Tasks ``radfl predict`` writes outputs for.
SUPPORTED_TASKS = ("classification", "segmentation", "detection", "instance")
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

    @property
    def class_names(self) -> list[str]:
        names = self.metadata.get("class_names") or range(int(self.metadata["num_classes"]))
        return [str(n) for n in names]


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
    version = found.get("version")
    if version != METADATA_VERSION:
        why = _OLDER_VERSIONS.get(version) if isinstance(version, int) else None
        raise ConfigError(
            f"model {source}: metadata version {version!r} is not the {METADATA_VERSION} this "
            f"RadFL reads" + (f" ({why}): re-run its federation with this RadFL" if why else "")
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


def load_ensemble(source: str) -> LoadedModel:
    """An ensemble folder (``radfl ensemble --out``) or comma-separated models (each as
    :func:`load_model` takes it) as one model: the mean of its members' probabilities
    (``common.ensemble``), predicted at its own threshold (none for a list: the arg-max)."""
    if ensemble.is_folder(source):
        network, metadata = ensemble.read_folder(Path(source))
        return LoadedModel(network, read_metadata(source, {METADATA_KEY: metadata}), source)
    members = [load_model(part.strip()) for part in source.split(",") if part.strip()]
    metadata = ensemble.shared_metadata([m.source for m in members], [m.metadata for m in members])
    network = ensemble.MeanProbabilities(
        [m.network for m in members], [m.temperature for m in members]
    )
    return LoadedModel(network, metadata, source)


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
    model: LoadedModel, study: Study, out: Path, *, overlays: bool = False, gradcam: bool = False
) -> dict[str, Any]:
    """Predict one study; its CSV row (masks, boxes, SEG and overlay files are written under
    ``out``; the overlay only with ``overlays``, a classifier's Grad-CAM map only with
    ``gradcam``)."""
    image = preprocess(study, model.metadata)
    overlay = out / "overlays" / f"{_safe_stem(study.name)}.png" if overlays else None
    row = _WRITERS[model.task](model, study, image, out, overlay)
    if overlay is not None:
        row["overlay"] = str(overlay)
    if gradcam:
        path = out / "gradcam" / f"{_safe_stem(study.name)}.png"
        predict_explain.write_gradcam(model.network, model.metadata, image, path)
        row["gradcam"] = str(path)
    return row


def _picture(model: LoadedModel, study: Study) -> Any:
    return predict_overlays.windowed_image(study.path, study.modality, model.metadata)


def _classification(
    model: LoadedModel, study: Study, image: torch.Tensor, out: Path, overlay: Path | None
) -> dict[str, Any]:
    with torch.no_grad():
        output = model.network(image)
    probabilities = calibrated_probabilities(output, model.temperature)[0].numpy()
    row = classification_row(model, probabilities)
    row["referral_entropy"] = predict_explain.referral_entropy(
        model.network, model.metadata, model.source, image
    )
    if overlay is not None:
        likeliest = model.class_names[int(np.argmax(probabilities))]
        caption = f"label {row['label']}: p({likeliest}) = {probabilities.max():.3f}"
        if len(probabilities) == 2:
            caption = f"label {row['label']}: p({model.class_names[1]}) = {probabilities[1]:.3f}"
            if model.metadata.get("threshold") is not None:
                caption += f" (threshold {float(model.metadata['threshold']):.3f})"
        predict_overlays.write_overlay(overlay, _picture(model, study), caption=caption)
    return row


def _segmentation(
    model: LoadedModel, study: Study, image: torch.Tensor, out: Path, overlay: Path | None
) -> dict[str, Any]:
    with torch.no_grad():
        output = model.network(image)
    mask = torch.argmax(output.float(), dim=1)[0].numpy().astype(np.uint8)
    native, affine = predict_outputs.native_mask(mask, study.path)
    stem = _safe_stem(study.name)
    nifti = out / "masks" / f"{stem}.nii.gz"
    predict_outputs.write_nifti(native, affine, nifti)
    row: dict[str, Any] = {"mask": str(nifti), "foreground_voxels": int((native > 0).sum())}
    if study.is_dicom:
        seg = out / "seg" / f"{stem}.dcm"
        predict_outputs.write_dicom_seg(native, study.path, seg, model.class_names)
        row["dicom_seg"] = str(seg)
    if overlay is not None:
        caption = f"{row['foreground_voxels']} voxels segmented"
        predict_overlays.write_overlay(
            overlay, _picture(model, study), labels=native, caption=caption
        )
    return row


def _boxes(
    model: LoadedModel, study: Study, image: torch.Tensor, out: Path, overlay: Path | None
) -> dict[str, Any]:
    """Detection and instance segmentation: boxes as JSON, instance maps as NIfTI."""
    task = predict_boxes.task_of(model.metadata)
    with torch.no_grad():
        prediction = predict_boxes.detect(task, model.network, image)
    order = predict_boxes.ranked(prediction)
    dims = int(model.metadata["spatial_dims"])
    grid = predict_boxes.input_grid(study.path, dims)
    boxes = predict_boxes.native_boxes(
        prediction["boxes"].detach().cpu().numpy(), grid, int(model.metadata["image_size"])
    )
    stem = _safe_stem(study.name)
    row: dict[str, Any] = {}
    voxels = None
    if "masks" in prediction:
        instances = predict_boxes.instance_map(prediction, order)
        native, affine = predict_outputs.native_mask(instances, study.path)
        nifti = out / "masks" / f"{stem}.nii.gz"
        predict_outputs.write_nifti(native, affine, nifti)
        voxels = np.bincount(native.ravel(), minlength=len(order) + 1)
        row["mask"] = str(nifti)
    document = predict_boxes.boxes_document(
        study.name,
        prediction,
        order,
        boxes,
        grid,
        class_names=model.class_names,
        threshold=predict_boxes.score_threshold(task, model.network),
        instance_voxels=voxels,
    )
    path = out / "boxes" / f"{stem}.json"
    predict_boxes.write_json(document, path)
    scores = [box["score"] for box in document["boxes"]]
    if overlay is not None:
        drawn = [box for box in document["boxes"] if box["score"] >= predict_overlays.DRAWN_SCORE]
        predict_overlays.write_overlay(
            overlay,
            _picture(model, study),
            # Instances are numbered by score: the drawn ones are the first.
            labels=None if "mask" not in row else np.where(native <= len(drawn), native, 0),
            boxes=np.asarray([box["box_voxel"] for box in drawn]).reshape(len(drawn), 2 * dims),
            box_texts=[f"{box['class']} {box['score']:.2f}" for box in drawn],
            caption=f"{len(drawn)} of {len(scores)} boxes drawn (score >= "
            f"{predict_overlays.DRAWN_SCORE})",
        )
    return {
        "boxes": str(path),
        "num_boxes": len(scores),
        "max_score": max(scores, default=0.0),
        **row,
    }


_WRITERS = {
    "classification": _classification,
    "segmentation": _segmentation,
    "detection": _boxes,
    "instance": _boxes,
}


def _safe_stem(name: str) -> str:
    stem = re.sub(r"(\.nii\.gz|\.[A-Za-z0-9]+)$", "", name.rstrip("/"))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_") or "study"


def predict(
    model: LoadedModel,
    studies: Sequence[Study],
    out: Path,
    *,
    progress: bool = True,
    overlays: bool = False,
    gradcam: bool = False,
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Predict every study; the table of results and ``(name, reason)`` of each failure."""
    rows: list[dict[str, Any]] = []
    failed: list[tuple[str, str]] = []
    # rich draws the progress on stderr, as radfl site check does.
    console = Console(stderr=True)
    for study in track(studies, "predicting", console=console, disable=not progress):
        try:
            row = predict_study(model, study, out, overlays=overlays, gradcam=gradcam)
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
    parser.add_argument(
        "model",
        help="run id, models:/NAME/VERSION, runs:/... or model folder; several, comma-separated, "
        "or an ensemble folder (radfl ensemble --out) predict as their ensemble",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        help="DICOM files or series folders, NIfTI, PNG/JPEG, .npy, site folders or manifests",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the outputs")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument(
        "--overlays",
        action="store_true",
        help="also draw each prediction on its input as overlays/<input>.png",
    )
    parser.add_argument(
        "--gradcam",
        action="store_true",
        help="classification: also write a Grad-CAM overlay PNG per study under OUT/gradcam",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    source = str(args.model)
    model = (
        load_ensemble(source) if "," in source or ensemble.is_folder(source) else load_model(source)
    )
    if args.gradcam and (
        model.task != "classification" or isinstance(model.network, ensemble.MeanProbabilities)
    ):
        raise ConfigError(
            f"--gradcam explains one classification network; model {source} is "
            + ("an ensemble" if model.task == "classification" else f"a {model.task} model")
        )
    studies, failed = collect_studies(list(args.inputs), model.task)
    for name, reason in failed:
        print(f"radfl predict: skipped {name}: {reason}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table, failed_now = predict(
        model,
        studies,
        out,
        progress=not args.quiet,
        overlays=bool(args.overlays),
        gradcam=bool(args.gradcam),
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
