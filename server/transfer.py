"""The federation's first global model from weights the coordinator provides (``initial-weights``).

A source is a weights file (a torch state dict), the id of a previous RadFL run (federated or
``radfl centralized``: the model it delivered, its best or final weights) or a registered model
``models:/NAME/VERSION`` (the weights of the run that logged that version). Nothing is
downloaded from outside the coordinator's own MLflow store.

Before use the file's SHA-256 must equal ``initial-weights-sha256`` and, for a run, the hash
RadFL recorded when it logged the weights (``server.tracking.log_weights``); a file with neither
is refused. Then ``common.transfer`` checks every layer against the network.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from common.config import ServerConfig
from common.errors import ConfigError
from common.transfer import (
    AdaptedWeights,
    adapt_weights,
    head_layers,
    load_weights_file,
    verify_sha256,
)
from server import tracking

_RUN_ID = re.compile(r"[0-9a-f]{32}")
_MODEL_URI = re.compile(r"models:/([^/]+)/(\d+)")


def load_initial_weights(config: ServerConfig, model: nn.Module) -> AdaptedWeights:
    """``initial-weights`` checked (checksum, layers, shapes, values) against ``model``."""
    source = config.initial_weights
    with tempfile.TemporaryDirectory() as folder:
        path, recorded = _local_file(source, Path(folder))
        expected = [h for h in (config.initial_weights_sha256, recorded) if h]
        if not expected:
            raise ConfigError(
                f"initial-weights {source}: no checksum to verify it against; set "
                "initial-weights-sha256 to the SHA-256 of the vetted file (sha256sum prints it)"
            )
        for wanted in expected:
            verify_sha256(path, wanted)
        state = load_weights_file(path)
    return adapt_weights(state, model, head_layers(config.model_config), source=source)


def _local_file(source: str, folder: Path) -> tuple[Path, str]:
    """The weights file of ``source`` (downloaded into ``folder`` from the MLflow store for a
    run or registered model) and the SHA-256 RadFL recorded for it ("" for a plain file)."""
    match = _MODEL_URI.fullmatch(source)
    if match is None and not _RUN_ID.fullmatch(source):
        return Path(source).expanduser(), ""
    if match is None:
        return run_weights(source, folder, what=f"initial-weights {source}")
    client = MlflowClient(tracking.tracking_uri())
    try:
        run_id = client.get_model_version(match[1], match[2]).run_id
    except MlflowException as exc:
        raise ConfigError(f"initial-weights {source}: {exc.message}") from exc
    if not run_id:
        raise ConfigError(f"initial-weights {source}: the version names no run")
    return run_weights(run_id, folder, what=f"initial-weights {source}")


def delivered_artifact(run: Run) -> str:
    """The weights a run delivered: its best round's where ``final-model = best`` chose it."""
    best = run.data.params.get("final_model") == "best" and tracking.BEST_ROUND_TAG in run.data.tags
    return f"weights/{'best' if best else 'final'}.pt"


def run_weights(
    run_id: str, folder: Path, artifact: str | None = None, *, what: str = "run"
) -> tuple[Path, str]:
    """A run's weights file ``artifact`` (by default the delivered one), downloaded into
    ``folder`` from the coordinator's MLflow store, and the SHA-256 recorded when it was logged
    ("" for a run logged before RadFL recorded it)."""
    client = MlflowClient(tracking.tracking_uri())
    try:
        run = client.get_run(run_id)
        artifact = artifact or delivered_artifact(run)
        path = Path(client.download_artifacts(run_id, artifact, str(folder)))
    except MlflowException as exc:
        raise ConfigError(
            f"{what}: not found in the MLflow store at {tracking.tracking_uri()}: {exc.message}"
        ) from exc
    return path, run.data.tags.get(f"{tracking.SHA256_TAG_PREFIX}{artifact}", "")
