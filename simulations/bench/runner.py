"""What ``radfl bench`` runs its parts with: the profiles that size them, and a runner that
launches ``radfl simulate`` / ``radfl centralized`` into one MLflow store and reads each run back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
from mlflow.tracking import MlflowClient

from common.config import default_run_config
from common.errors import RadFLError
from server import tracking

EXPERIMENT = "radfl-bench"


class BenchError(RadFLError):
    """A benchmark run failed; the message names the run and ends with its output."""


@dataclass(frozen=True)
class Profile:
    """How large each part's runs are."""

    name: str
    sites: int
    samples_per_site: int
    image_size: int
    rounds: int
    local_epochs: int
    batch_size: int
    seeds: tuple[int, ...]
    classification_model: str
    segmentation_model: str
    strategies: tuple[str, ...]
    #: Compressions compared by ``comm`` (the first is the reference), on ``comm_task``.
    compressions: tuple[str, ...] = ("none", "fp16", "int8")
    comm_task: str = "segmentation"
    tasks: tuple[str, ...] = ("classification", "segmentation")
    #: Alternating repeats of ``radfl simulate`` and the bare loop (``overhead``).
    overhead_repeats: int = 2
    #: Alternating epochs of RadFL's trainer and a bare epoch (``overhead``); the first pair
    #: warms up. One epoch is about a second here and varies by 10% or more from run to run.
    throughput_repeats: int = 7
    #: Simulated sites of ``scale``, with ``scale_samples`` images each, ``scale_rounds`` rounds.
    scale_sites: tuple[int, ...] = (10, 100)
    scale_samples: int = 16
    scale_rounds: int = 1
    #: ``privacy``: the classification network attacked, the attacker's budget in Adam
    #: iterations, the image size and batch sizes of gradient inversion, the sites summed under
    #: SecAgg, and the epsilons (delta 1e-5) of the DP columns.
    privacy_model: str = "small-cnn"
    inversion_iterations: int = 300
    inversion_image_size: int = 32
    inversion_batch_sizes: tuple[int, ...] = (1, 4)
    secagg_sites: int = 3
    privacy_epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    #: ``startup``: whole-process runs of each kind, the median is reported (issue 22).
    startup_repeats: int = 3
    #: Strategies ``scale`` measures: the running mean (fedavg) and two that need every
    #: update at once and hold them on disk (fedmedian, krum; issue 18).
    scale_strategies: tuple[str, ...] = ("fedavg", "fedmedian", "krum")
    #: ``steady``: the largest fall of the validation curve below its running best is
    #: counted after this round (issue 22: 5).
    steady_after_round: int = 5

    def model(self, task: str) -> str:
        """The network this profile benchmarks ``task`` with: a profile names one per task it
        runs (a task it names none for is refused, not given another task's network)."""
        models = {
            "classification": self.classification_model,
            "segmentation": self.segmentation_model,
        }
        if task not in models:
            raise BenchError(f"profile {self.name} names no model for task {task!r}")
        return models[task]

    def run_config(self) -> dict[str, Any]:
        return {
            "image-size": self.image_size,
            "synthetic-samples-per-site": self.samples_per_site,
            "local-epochs": self.local_epochs,
            "batch-size": self.batch_size,
            "min-cell-size": 2,
        }


PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick",
        sites=2,
        samples_per_site=40,
        image_size=32,
        rounds=1,
        local_epochs=1,
        batch_size=8,
        seeds=(0,),
        classification_model="small-cnn",
        segmentation_model="unet",
        strategies=("fedavg",),
        compressions=("none", "int8"),
        overhead_repeats=1,
        throughput_repeats=2,
        scale_sites=(2, 4),
        scale_samples=16,
        scale_rounds=1,
        inversion_iterations=20,
        inversion_image_size=16,
        inversion_batch_sizes=(1,),
        privacy_epsilons=(8.0,),
        scale_strategies=("fedavg",),
        startup_repeats=1,
    ),
    # 64 px: at 32 px neither task learned here (pooled test AUC 0.50 after 30 epochs, Dice
    # 0.05 after 12). Batch 8: federated training is limited by optimiser steps at this budget
    # (segmentation, 8 epochs: FedAvg Dice 0.00 at batch 16, 0.36 at batch 4).
    "cpu": Profile(
        name="cpu",
        sites=3,
        samples_per_site=100,
        image_size=64,
        rounds=5,
        local_epochs=2,
        batch_size=8,
        seeds=(0, 1, 2),
        classification_model="resnet18",
        segmentation_model="unet",
        strategies=("fedavg", "fedprox", "fedadam", "fedbn"),
        # fp16 (0.501x the bytes, measured with this profile on 2026-11-27) is left out for
        # time: the profile has to finish within 45 minutes here.
        compressions=("none", "int8"),
        # 16 px, batch 1: one attack iteration at 32 px took 0.5 to 2 s on this shared
        # 2-core machine (2026-11-29), 300 of them for each of five columns did not fit.
        inversion_iterations=150,
        inversion_image_size=16,
        inversion_batch_sizes=(1,),
    ),
}
#: The default run of ``pyproject.toml`` (data, image size, rounds, epochs, batch), for a GPU
#: machine; read from it, so that a changed default is what this profile measures.
_DEFAULTS = default_run_config()
PROFILES["gpu"] = replace(
    PROFILES["cpu"],
    name="gpu",
    samples_per_site=int(_DEFAULTS["synthetic-samples-per-site"]),
    image_size=int(_DEFAULTS["image-size"]),
    rounds=int(_DEFAULTS["num-rounds"]),
    local_epochs=int(_DEFAULTS["local-epochs"]),
    batch_size=int(_DEFAULTS["batch-size"]),  # 0: the task's own
    compressions=("none", "fp16", "int8"),
    inversion_iterations=300,
    inversion_image_size=32,
    inversion_batch_sizes=(1, 4),
)


@dataclass
class RunResult:
    """One finished MLflow run: its id, last value of each metric, and wall time."""

    run_id: str
    metrics: dict[str, float]
    wall_s: float
    client: MlflowClient = field(repr=False)
    #: Peak memory of the run's whole process tree (sum of unique set sizes), bytes.
    peak_memory: int = 0

    def history(self, name: str) -> list[float]:
        return [m.value for m in self.client.get_metric_history(self.run_id, name)]

    def artifact_text(self, path: str) -> str | None:
        try:
            local = self.client.download_artifacts(self.run_id, path)
        except Exception:  # noqa: BLE001 - an absent artifact is a normal answer here
            return None
        return Path(local).read_text()


def _peak_tree_memory(process: subprocess.Popen, interval: float = 0.5) -> int:
    """Wait for ``process``; return the peak over time of the summed unique memory (USS) of
    it and all its descendants (the SuperLink, the simulation runtime, Ray and its workers)."""
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        total = 0
        try:
            members = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for member in members:
            try:
                total += member.memory_full_info().uss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        peak = max(peak, total)
        time.sleep(interval)
    process.wait()
    return peak


class Runner:
    """Launches ``radfl simulate`` / ``radfl centralized`` into one MLflow store under ``out``."""

    def __init__(self, out: Path, *, verbose: bool = False) -> None:
        self.out = out.resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = f"sqlite:///{self.out / 'mlflow.db'}"
        self.verbose = verbose
        self.radfl = str(Path(sys.executable).parent / "radfl")
        #: ``privacy-utility``: the modes to run (empty: all).
        self.modes: tuple[str, ...] = ()

    def run(
        self,
        command: str,
        *,
        task: str,
        model: str,
        sites: int,
        rounds: int,
        seed: int,
        settings: Mapping[str, Any],
        options: Iterable[str] = (),
        measure_memory: bool = False,
        on_line: Callable[[str], None] | None = None,
    ) -> RunResult:
        """One run; with ``measure_memory``, also its process tree's peak memory (sampling
        it costs CPU, so only ``scale`` asks); ``on_line`` is called with each line of the
        run's output as it is printed (``startup`` times the phases by them)."""
        run_key = uuid.uuid4().hex
        values = {**settings, "run-key": run_key, "experiment-name": EXPERIMENT}
        overrides = [part for k, v in values.items() for part in ("--set", f"{k}={v}")]
        argv = [
            self.radfl,
            command,
            *("--task", task, "--model", model, "--sites", str(sites)),
            *("--rounds", str(rounds), "--seed", str(seed), "--workdir", str(self.out / ".radfl")),
            *options,
            *overrides,
        ]
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri}
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        started = time.monotonic()
        with tempfile.TemporaryFile("w+") as log:
            process = subprocess.Popen(
                argv,
                cwd=self.out,
                env=env,
                stdout=log if on_line is None else subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            if on_line is not None:
                assert process.stdout is not None  # guaranteed by stdout=PIPE
                for line in process.stdout:
                    on_line(line)
                    log.write(line)
            peak = _peak_tree_memory(process) if measure_memory else 0
            process.wait()
            wall = time.monotonic() - started
            log.seek(0)
            output = log.read()
        if self.verbose:
            print(output[-3000:], file=sys.stderr)
        label = " ".join(argv[1:])
        if process.returncode != 0:
            raise BenchError(f"`radfl {label}` exited with {process.returncode}:\n{output[-3000:]}")
        client = MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        runs = (
            client.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.`{tracking.RUN_KEY_TAG}` = '{run_key}'",
            )
            if experiment is not None
            else []
        )
        if not runs:
            raise BenchError(f"`radfl {label}` finished but logged no MLflow run")
        run = runs[0]
        return RunResult(run.info.run_id, dict(run.data.metrics), wall, client, peak)
