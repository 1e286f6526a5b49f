"""MLflow tracking of a federated run, on the coordinator only (sites never talk to MLflow).

One MLflow run per federated run: the configuration as params; per round the training loss, the
pooled evaluation metrics (computed from the summed metric states of all sites) and each site's
own metrics; at the end the best and final global models as artifacts and the final model in
the model registry.

The tracking URI comes from ``MLFLOW_TRACKING_URI``; without it, an embedded SQLite store
``mlflow.db`` in the working directory, with artifacts in ``mlartifacts/`` beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from common.calibration import calibrated_threshold
from common.config import ClientConfig, ServerConfig
from common.imaging import DEFAULT_CT_WINDOW_HU, PERCENTILES
from common.transfer import sha256_of
from server.checkpoint import validate_run_key

RUN_KEY_TAG = "radfl.run-key"
MODE_TAG = "radfl.mode"
BEST_ROUND_TAG = "radfl.best-round"
#: Prefix of the tag holding a logged weights file's SHA-256 (``radfl.sha256.weights/best.pt``):
#: what ``initial-weights`` checks a previous run's weights against (server/transfer.py).
SHA256_TAG_PREFIX = "radfl.sha256."
#: The key of the logged model's metadata (``MLmodel``) that ``radfl predict`` reads.
MODEL_METADATA_KEY = "radfl"
#: Bumped when the metadata's fields or the preprocessing they name change meaning; ``radfl
#: predict`` refuses other versions. 2: images are z-scored per image after the intensity
#: window (``client/preprocessing.py`` step 5), so a version-1 model would get other inputs.
MODEL_METADATA_VERSION = 2


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, or the embedded SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


#: Where an empty SQLite store of this MLflow version is kept, to be copied (``ensure_store``).
STORE_CACHE_ENV = "RADFL_MLFLOW_STORE_CACHE"


def ensure_store(uri: str) -> None:
    """Create the SQLite store ``uri`` names, if it does not exist, as a copy of an empty store
    of this MLflow version made once (``$RADFL_MLFLOW_STORE_CACHE``, default
    ``~/.cache/radfl``): MLflow builds a new store by running its whole migration history,
    10 s here on a busy 2-core machine, once for every run or test with a store of its own.
    Other URIs are left to MLflow."""
    if not uri.startswith("sqlite:///"):
        return
    target = Path(uri.removeprefix("sqlite:///"))
    if target.exists():
        return
    template = _empty_store()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    try:
        partial.write_bytes(template.read_bytes())
        # What MLflow writes into a new store: its Default experiment, under the working folder.
        now_ms = int(time.time() * 1000)
        with sqlite3.connect(partial) as db:
            db.execute(
                "UPDATE experiments SET artifact_location = ?, creation_time = ?, "
                "last_update_time = ? WHERE experiment_id = 0",
                (str(Path.cwd() / "mlruns" / "0"), now_ms, now_ms),
            )
        db.close()
        with contextlib.suppress(FileExistsError):  # another process created it meanwhile
            os.link(partial, target)  # never over that store
    finally:
        partial.unlink(missing_ok=True)


def _empty_store() -> Path:
    """The empty store of this MLflow version, created on first use (atomically: processes
    that race each build one and the last rename wins, every one of them complete)."""
    folder = Path(os.environ.get(STORE_CACHE_ENV) or Path.home() / ".cache" / "radfl")
    template = folder / f"mlflow-{mlflow.__version__}-empty.db"
    if template.exists():
        return template
    folder.mkdir(parents=True, exist_ok=True)
    building = folder / f".{template.name}.{uuid.uuid4().hex}"
    try:
        MlflowClient(f"sqlite:///{building}").search_experiments()
        os.replace(building, template)
    finally:
        building.unlink(missing_ok=True)
    return template


def ensure_experiment(name: str) -> str:
    """The experiment's id, creating it (with a local artifact folder for SQLite stores)."""
    uri = tracking_uri()
    ensure_store(uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    artifact_location = None
    if uri.startswith("sqlite:///"):
        artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return str(mlflow.create_experiment(name, artifact_location=artifact_location))


def registered_model_name(config: ServerConfig) -> str:
    return f"radfl-{config.task}-{config.model}-{config.spatial_dims}d"


@contextmanager
def start_run(
    config: ServerConfig,
    *,
    mode: str,
    training: ClientConfig | None = None,
    run_name: str | None = None,
    resume_run_id: str = "",
) -> Iterator[mlflow.ActiveRun]:
    """Start the MLflow run of a federated (or centralized) run, logging its config and the
    sites' ``training`` config (batch size resolved); with ``resume_run_id``, reopen that run
    (a resumed run logs into the run it continues)."""
    if resume_run_id:
        with mlflow.start_run(run_id=resume_run_id) as run:
            yield run
        return
    experiment_id = ensure_experiment(config.experiment_name)
    tags = {MODE_TAG: mode}
    if config.run_key:
        tags[RUN_KEY_TAG] = validate_run_key(config.run_key)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        params = dataclasses.asdict(training) if training else {}
        params.update(dataclasses.asdict(config))
        params.pop("run_key")
        mlflow.log_params(params)
        yield run


def log_metrics(metrics: Mapping[str, float], step: int) -> None:
    """Log finite metrics at ``step``; NaN (undefined, e.g. AUC without positives) is skipped."""
    finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
    if finite:
        mlflow.log_metrics(finite, step=step)


def log_models(
    model: torch.nn.Module,
    *,
    final_state: Mapping[str, torch.Tensor],
    best_state: Mapping[str, torch.Tensor] | None,
    best_round: int | None,
    config: ServerConfig,
    register_as: str | None,
    registered_state: Mapping[str, torch.Tensor] | None = None,
    threshold: float | None = None,
    temperature: float | None = None,
) -> None:
    """Log best and final weights as artifacts, and the model the run delivers (registered if
    asked): ``registered_state`` (the evaluated model, best or last), else the final one.

    The delivered model carries in its ``MLmodel`` metadata (``model_metadata``) everything
    ``radfl predict`` needs to preprocess as in training and to threshold, without the run's
    config: ``threshold`` is the report's operating threshold (chosen on pooled validation),
    ``temperature`` the calibration temperature fitted there (``None``: 1.0)."""
    with tempfile.TemporaryDirectory() as folder:
        for name, state in (("final", final_state), ("best", best_state)):
            if state is None:
                continue
            path = Path(folder) / f"{name}.pt"
            log_weights(state, path)
        info = {
            "task": config.task,
            "model": config.model,
            "spatial_dims": config.spatial_dims,
            "num_classes": config.num_classes,
            "image_size": config.image_size,
            "best_round": best_round,
        }
        info_path = Path(folder) / "model.json"
        info_path.write_text(json.dumps(info, indent=2))
        mlflow.log_artifact(str(info_path), artifact_path="weights")
    if best_round is not None:
        mlflow.set_tag(BEST_ROUND_TAG, str(best_round))
    model.load_state_dict(dict(registered_state if registered_state is not None else final_state))
    common_package = Path(__file__).resolve().parent.parent / "common"
    example = np.zeros((1, 1) + (config.image_size,) * config.spatial_dims, dtype=np.float32)
    model = model.cpu().eval()
    with torch.no_grad():
        single_tensor = isinstance(model(torch.from_numpy(example)), torch.Tensor)
    # MLflow's default pt2 export and its output-signature inference need one output tensor;
    # RetinaNet returns a dict of maps, so it is pickled and its signature names the input only.
    described: dict[str, Any] = (
        {"input_example": example}
        if single_tensor
        else {
            "signature": ModelSignature(
                inputs=Schema([TensorSpec(example.dtype, (-1, *example.shape[1:]))])
            )
        }
    )
    Model.log(
        flavor=ServedPyTorch,
        pytorch_model=model,
        artifact_path=None,
        name="final-model",
        serialization_format="pt2" if single_tensor else "pickle",
        **described,
        metadata={MODEL_METADATA_KEY: model_metadata(config, threshold, temperature)},
        registered_model_name=register_as,
        # Given explicitly: inferring requirements would import the model in a subprocess.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "monai"],
        # client/ too: the pyfunc loader (client/serving.py) preprocesses as the sites do.
        code_paths=[str(common_package), str(common_package.parent / "client")],
    )


#: The pyfunc loader of the registered model: it takes image paths, uploaded files or arrays.
SERVING_LOADER = "client.serving"


class ServedPyTorch:
    """``mlflow.pytorch`` as a flavour whose ``python_function`` loader is RadFL's serving
    module (named, never imported: the coordinator does not import site code), so the model
    loads both as PyTorch and as a pyfunc that preprocesses images as the sites do."""

    @staticmethod
    def save_model(path: str, mlflow_model: Model, **kwargs: Any) -> None:
        mlflow.pytorch.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        if "python_function" in mlflow_model.flavors:
            mlflow_model.flavors["python_function"]["loader_module"] = SERVING_LOADER
            # The tensor example served pt2's export; the pyfunc takes tables of paths or
            # uploads, which a tensor signature would refuse.
            mlflow_model.signature = None
            mlflow_model.saved_input_example_info = None  # type: ignore[assignment]
        mlflow_model.save(str(Path(path) / "MLmodel"))


def log_weights(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Save ``state`` to ``path`` and log it under ``weights/`` with its SHA-256 as a tag."""
    torch.save(dict(state), path)
    mlflow.log_artifact(str(path), artifact_path="weights")
    mlflow.set_tag(f"{SHA256_TAG_PREFIX}weights/{path.name}", sha256_of(path))


def model_metadata(
    config: ServerConfig, threshold: float | None, temperature: float | None = None
) -> dict[str, Any]:
    """What a logged model carries to be used without its run: the task and network, the
    preprocessing of ``client/preprocessing.py`` (its defaults: the run config sets none of
    them), class names, the operating threshold (``None`` where the task has none or no
    report was written) and the calibration temperature (``common.calibration``: 1.0 where
    none was fitted). ``radfl predict`` divides the logits by the temperature before the
    softmax, so the threshold it carries is moved onto the calibrated scale: it makes exactly
    the decisions the report's ``threshold`` made on the uncalibrated probabilities."""
    fitted = temperature if temperature is not None and math.isfinite(temperature) else 1.0
    if threshold is not None and math.isfinite(threshold):
        threshold = calibrated_threshold(threshold, fitted)
    return {
        "version": MODEL_METADATA_VERSION,
        "task": config.task,
        "model": config.model,
        "spatial_dims": config.spatial_dims,
        "image_size": config.image_size,
        "num_classes": config.num_classes,
        # GroupNorm where the run trained with DP (common.privacy.private_model)
        "normalisation": config.model_config.normalisation,
        "class_names": [str(k) for k in range(config.num_classes)],
        "ct_window_hu": list(DEFAULT_CT_WINDOW_HU),
        "percentiles": list(PERCENTILES),
        "spacing_mm": None,
        "threshold": threshold if threshold is not None and math.isfinite(threshold) else None,
        "temperature": fitted,
        # The final evaluation's uncertainty (common.uncertainty): radfl predict's
        # referral_entropy column is the quantity the report's selective curve bins.
        "uncertainty": config.uncertainty,
    }


def find_run(run_key: str, experiment_name: str) -> Any | None:
    """The MLflow run tagged with ``run_key`` (as ``radfl simulate`` finds the run it launched)."""
    # The key goes into a filter string: only a plain name may (no quotes, no backticks).
    validate_run_key(run_key)
    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    client = MlflowClient()
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'"
    )
    return runs[0] if runs else None


def log_text(text: str, path: str) -> None:
    """Write ``text`` to the artifact ``path`` of the active run (replacing it)."""
    mlflow.log_text(text, path)


def has_step(run_id: str, metric: str, step: int) -> bool:
    """Whether ``metric`` of the run was logged at ``step``."""
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, metric)
    return any(m.step == step for m in history)
