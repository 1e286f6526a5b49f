"""``radfl bench --parts startup``: what a run costs before and after its training (issue 22).

Two measurements, each the median of ``startup_repeats`` whole processes:

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

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.marks: dict[str, float] = {}

    def __call__(self, line: str) -> None:
        for name, pattern in PHASES:
            if pattern is not None and name not in self.marks and pattern.search(line):
                self.marks[name] = time.monotonic() - self.started

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


def startup(profile: Profile, runner: Runner) -> pd.DataFrame:
    """The phase profile of the fixed-cost run, its whole-process time, and the workload's
    federated / centralized wall-time ratio; medians over ``profile.startup_repeats``."""
    settings = {**profile.run_config(), "synthetic-samples-per-site": STARTUP_SAMPLES}
    profiles: list[dict[str, float | None]] = []
    walls: list[float] = []
    run_ids: list[str] = []
    for _ in range(profile.startup_repeats):
        clock = PhaseClock()
        run = _run(runner, "simulate", profile, STARTUP_SITES, 1, settings, on_line=clock)
        # The runner's clock starts before the process; the phase clock a moment later.
        profiles.append(clock.durations(run.wall_s))
        walls.append(run.wall_s)
        run_ids.append(run.run_id)
    rows: list[dict[str, Any]] = []
    for name, _ in PHASES:
        values = [p[name] for p in profiles if p[name] is not None]
        rows.append(
            {
                "measure": f"phase: {name}",
                "seconds": statistics.median(values) if values else float("nan"),
                "note": "" if values else "not a step of this way of running",
                "run_id": run_ids[-1],
            }
        )
    rows.append(
        {
            "measure": f"whole process: simulate {STARTUP_SITES} sites x {STARTUP_SAMPLES} "
            f"images, 1 round, {profile.classification_model}",
            "seconds": statistics.median(walls),
            "note": f"median of {len(walls)}: " + ", ".join(f"{w:.1f}" for w in walls),
            "run_id": run_ids[-1],
        }
    )
    return pd.DataFrame(rows + _workload(profile, runner))


def _workload(profile: Profile, runner: Runner) -> list[dict[str, Any]]:
    settings = {**profile.run_config(), "local-epochs": 1}
    walls: dict[str, list[float]] = {"simulate": [], "centralized": []}
    last: dict[str, str] = {}
    for _ in range(profile.startup_repeats):
        for command in walls:  # alternating, so that a busy spell hits both
            run = _run(
                runner, command, profile, WORKLOAD_SITES, WORKLOAD_ROUNDS, settings,
                model=WORKLOAD_MODEL,
            )  # fmt: skip
            walls[command].append(run.wall_s)
            last[command] = run.run_id
    federated = statistics.median(walls["simulate"])
    central = statistics.median(walls["centralized"])
    shape = (
        f"{WORKLOAD_SITES} sites x {profile.samples_per_site} images, {WORKLOAD_ROUNDS} rounds "
        f"of 1 epoch, {WORKLOAD_MODEL}"
    )
    return [
        {
            "measure": f"workload: simulate, {shape}",
            "seconds": federated,
            "note": ", ".join(f"{w:.1f}" for w in walls["simulate"]),
            "run_id": last["simulate"],
        },
        {
            "measure": "workload: centralized, the same images and epochs",
            "seconds": central,
            "note": ", ".join(f"{w:.1f}" for w in walls["centralized"]),
            "run_id": last["centralized"],
        },
        {
            "measure": "workload: simulate / centralized (wall time)",
            "seconds": federated / central,
            "note": "a ratio, not seconds",
            "run_id": "",
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
        options=["--verbose"] if command == "simulate" else [],
        on_line=on_line,
    )
