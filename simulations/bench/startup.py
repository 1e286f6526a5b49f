"""``radfl bench --parts startup``: what a run costs before and after its training (issue 22).

Two measurements, each the median of ``startup_repeats`` whole processes, for each way
``radfl simulate`` can run (``WAYS``):

- the fixed cost of a one-round ``radfl simulate`` of 3 sites with 24 images each, phase by
  phase: each phase ends at the first output line that marks it (``PHASES``), timed as the
  line is printed, so the profile reads the same whatever runs the federation;
- a small workload (3 sites, 3 rounds, ``small-cnn``) against ``radfl centralized`` training
  of the same images for the same number of epochs: the ratio is what federating costs here.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import pandas as pd

from simulations.bench.runner import Profile, Runner, RunResult

#: Phases of ``radfl simulate``, each ending at the first output line matching its pattern;
#: a phase whose line never comes (a step this way of running does not have) is left empty.
#: The last phase ends when the process exits.
PHASES: tuple[tuple[str, re.Pattern[str] | None], ...] = (
    ("imports, config, synthetic data", re.compile(r"^RadFL simulation:")),
    ("SuperLink start, app build, flwr run submit", re.compile(r"Successfully started run")),
    ("app install into FLWR_HOME", re.compile(r"Successfully installed")),
    ("ServerApp start, MLflow store and run", re.compile(r"\[radfl\] MLflow run")),
    ("Ray and ClientApp start, first message", re.compile(r"\[radfl\] \d+ sites:")),
    ("untrained model's evaluation", re.compile(r"\[radfl\] untrained model")),
    ("the round: training and evaluation", re.compile(r"\[radfl\] final evaluation")),
    ("final evaluation and report", re.compile(r"\[radfl\] (test |no site returned)")),
    ("model logging", re.compile(r"\[radfl\] finished")),
    ("shutdown, summary, overlays", None),
)
#: The fixed-cost run (issue 22): one round, 3 sites of 24 images.
STARTUP_SITES = 3
STARTUP_SAMPLES = 24
#: The small workload: 3 sites, 3 rounds of one epoch, compared with pooled training.
WORKLOAD_SITES = 3
WORKLOAD_ROUNDS = 3
WORKLOAD_MODEL = "small-cnn"


class PhaseClock:
    """Seconds from start to the first line of each phase; call it with each output line."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self.now = now
        self.started = now()
        self.marks: dict[str, float] = {}

    def __call__(self, line: str) -> None:
        for name, pattern in PHASES:
            if pattern is not None and name not in self.marks and pattern.search(line):
                self.marks[name] = self.now() - self.started

    def durations(self, wall_s: float) -> dict[str, float | None]:
        """Each phase's seconds (``None`` for a phase that did not happen)."""
        out: dict[str, float | None] = {}
        previous = 0.0
        for name, pattern in PHASES:
            end = wall_s if pattern is None else self.marks.get(name)
            if end is None:
                out[name] = None
                continue
            out[name] = max(0.0, end - previous)
            previous = end
        return out


#: The ways ``radfl simulate`` runs a federation, profiled side by side (alternating, so that
#: a busy spell on a shared machine hits each): ``--superlink`` as before issue 22, in this
#: process with the sites in Ray actors (``--backend ray``), and the default, sites and all in
#: this process (``simulations.local_backend``).
WAYS: dict[str, tuple[str, ...]] = {
    "superlink_s": ("--superlink",),
    "in_process_ray_s": ("--backend", "ray"),
    "in_process_s": (),
}


def startup(profile: Profile, runner: Runner) -> pd.DataFrame:
    """The phase profile of the fixed-cost run, its whole-process time, each way of running,
    and the workload's federated / centralized wall-time ratio; medians over
    ``profile.startup_repeats``."""
    settings = {**profile.run_config(), "synthetic-samples-per-site": STARTUP_SAMPLES}
    profiles: dict[str, list[dict[str, float | None]]] = {way: [] for way in WAYS}
    walls: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(profile.startup_repeats):
        for way, options in WAYS.items():
            clock = PhaseClock()
            run = _run(
                runner, "simulate", profile, STARTUP_SITES, 1, settings, options=options,
                on_line=clock,
            )  # fmt: skip
            profiles[way].append(clock.durations(run.wall_s))
            walls[way].append(run.wall_s)
    rows: list[dict[str, Any]] = []
    for name, _ in PHASES:
        row: dict[str, Any] = {"measure": f"phase: {name}"}
        for way in WAYS:
            values = [v for p in profiles[way] if (v := p[name]) is not None]
            row[way] = statistics.median(values) if values else float("nan")
        row["note"] = ""
        rows.append(row)
    rows.append(
        {
            "measure": f"whole process: simulate {STARTUP_SITES} sites x {STARTUP_SAMPLES} "
            f"images, 1 round, {profile.classification_model}",
            **{way: statistics.median(walls[way]) for way in WAYS},
            "note": "; ".join(
                f"{way} " + ", ".join(f"{w:.1f}" for w in walls[way]) for way in WAYS
            ),
        }
    )
    return pd.DataFrame(rows + _workload(profile, runner))


def _workload(profile: Profile, runner: Runner) -> list[dict[str, Any]]:
    """Rows of the small workload: each way of running, and pooled training (its one column
    holds the same time), with the ratio to pooled training."""
    settings = {**profile.run_config(), "local-epochs": 1}
    walls: dict[str, list[float]] = {way: [] for way in WAYS}
    central: list[float] = []
    for _ in range(profile.startup_repeats):
        for way, options in WAYS.items():  # alternating with pooled training
            walls[way].append(
                _run(
                    runner, "simulate", profile, WORKLOAD_SITES, WORKLOAD_ROUNDS, settings,
                    model=WORKLOAD_MODEL, options=options,
                ).wall_s
            )  # fmt: skip
        central.append(
            _run(
                runner, "centralized", profile, WORKLOAD_SITES, WORKLOAD_ROUNDS, settings,
                model=WORKLOAD_MODEL,
            ).wall_s
        )  # fmt: skip
    federated = {way: statistics.median(walls[way]) for way in WAYS}
    pooled = statistics.median(central)
    shape = (
        f"{WORKLOAD_SITES} sites x {profile.samples_per_site} images, {WORKLOAD_ROUNDS} rounds "
        f"of 1 epoch, {WORKLOAD_MODEL}"
    )
    return [
        {
            "measure": f"workload: simulate, {shape}",
            **federated,
            "note": "; ".join(
                f"{way} " + ", ".join(f"{w:.1f}" for w in walls[way]) for way in WAYS
            ),
        },
        {
            "measure": "workload: centralized, the same images and epochs",
            **{way: pooled for way in WAYS},
            "note": ", ".join(f"{w:.1f}" for w in central),
        },
        {
            "measure": "workload: simulate / centralized (wall time, a ratio)",
            **{way: federated[way] / pooled for way in WAYS},
            "note": "issue 22 asks at most 1.3",
        },
    ]


def _run(
    runner: Runner,
    command: str,
    profile: Profile,
    sites: int,
    rounds: int,
    settings: dict[str, Any],
    *,
    model: str | None = None,
    options: tuple[str, ...] = (),
    on_line: Callable[[str], None] | None = None,
) -> RunResult:
    return runner.run(
        command,
        task="classification",
        model=model or profile.classification_model,
        sites=sites,
        rounds=rounds,
        seed=profile.seeds[0],
        settings=settings,
        options=[*options, "--verbose"] if command == "simulate" else list(options),
        on_line=on_line,
    )
