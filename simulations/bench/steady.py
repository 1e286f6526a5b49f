"""``radfl bench --parts steady``: does the federated validation curve rise like pooled
training's, and does the federated model end as good (issue 22, item 5)?

For each of the profile's seeds it runs ``radfl simulate`` and ``radfl centralized`` on the
same sites, seed and sample budget (the ``gpu`` profile: the default run of
``pyproject.toml``), and reads back from MLflow:

- the pooled validation AUC of every round (federated) and every block of ``local-epochs``
  epochs (centralized), written long to ``steady_rounds.csv``;
- the largest drop of that curve below its running best after round ``steady_after_round``
  (the best so far includes the earlier rounds), and the same for the mean of the sites' own
  validation AUCs per round (federated): the pooled AUC also moves with how a model ranks the
  hospitals, whose prevalences differ;
- the final test AUC of both runs with their intervals, their ratio, and each site's test AUC
  (the pooled AUC partly rewards telling the hospitals apart, whose prevalence differs).

``steady.csv`` has one row per seed; ``passes`` is the issue's target: a drop of at most
``MAX_DROP`` and a ratio of at least ``MIN_RATIO``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from common.tasks import task_class

if TYPE_CHECKING:
    from simulations.bench.runner import Profile, Runner, RunResult

TASK = "classification"
#: Issue 22's targets: no drop of more than this from the running best after the first
#: rounds, and a final test metric of at least this share of pooled training's.
MAX_DROP = 0.08
MIN_RATIO = 0.99
FEDERATED, CENTRALIZED = "federated", "centralized"


def largest_drop(values: Sequence[tuple[int, float]], after_round: int) -> tuple[float, int]:
    """The largest fall of ``values`` ((round, value), any order) below their running best
    at a round after ``after_round``, and the round it happened at (0.0 and -1 if none). The
    running best counts every earlier round, including those up to ``after_round``."""
    best = -math.inf
    drop, at = 0.0, -1
    for step, value in sorted(values):
        if math.isnan(value):
            continue
        if step > after_round and best - value > drop:
            drop, at = best - value, step
        best = max(best, value)
    return drop, at


def steady(profile: Profile, runner: Runner) -> pd.DataFrame:
    """One row per seed; the per-round curves go to ``steady_rounds.csv``."""
    metric = task_class(TASK).primary_metric
    common: dict[str, Any] = {
        "task": TASK,
        "model": profile.classification_model,
        "sites": profile.sites,
        "rounds": profile.rounds,
        "settings": profile.run_config(),
    }
    rows, curves = [], []
    for seed in profile.seeds:
        runs = {
            FEDERATED: runner.run("simulate", seed=seed, **common),
            CENTRALIZED: runner.run("centralized", seed=seed, **common),
        }
        for training, run in runs.items():
            for step, value in curve(run, f"pooled/{metric}"):
                curves.append(
                    {"seed": seed, "training": training, "round": step,
                     "pooled_validation": value, "run_id": run.run_id}
                )  # fmt: skip
        rows.append(seed_row(profile, seed, runs[FEDERATED], runs[CENTRALIZED], metric))
        # Written as each seed ends: a later seed's failure keeps the earlier ones' hours.
        pd.DataFrame(curves).to_csv(runner.out / "steady_rounds.csv", index=False)
        pd.DataFrame(rows).to_csv(runner.out / "steady.csv", index=False)
    table = pd.DataFrame(curves)
    if len(table):
        wide = table.pivot_table(
            index="round", columns=["seed", "training"], values="pooled_validation"
        )
        print(f"\n## steady: pooled validation {metric} per round\n", flush=True)
        print(wide.to_string(float_format=lambda v: f"{v:.3f}"), flush=True)
    return pd.DataFrame(rows)


def curve(run: RunResult, name: str) -> list[tuple[int, float]]:
    """(round, value) of a metric's history; round 0 is the untrained model."""
    history = run.client.get_metric_history(run.run_id, name)
    return sorted((int(m.step), float(m.value)) for m in history)


def mean_curve(run: RunResult, names: Sequence[str]) -> list[tuple[int, float]]:
    """(round, mean of the metrics ``names``) over the rounds where every one was logged."""
    curves = [dict(curve(run, name)) for name in names]
    rounds = set.intersection(*(set(c) for c in curves)) if curves else set()
    return [(r, sum(c[r] for c in curves) / len(curves)) for r in sorted(rounds)]


def seed_row(
    profile: Profile, seed: int, federated: RunResult, centralized: RunResult, metric: str
) -> dict[str, Any]:
    after = profile.steady_after_round
    fed_drop, fed_at = largest_drop(curve(federated, f"pooled/{metric}"), after)
    sites = [f"site/site-{site}/{metric}" for site in range(profile.sites)]
    per_hospital_drop, _ = largest_drop(mean_curve(federated, sites), after)
    central_drop, _ = largest_drop(curve(centralized, f"pooled/{metric}"), after)
    fed_test = federated.metrics.get(f"test/{metric}", math.nan)
    central_test = centralized.metrics.get(f"test/{metric}", math.nan)
    ratio = fed_test / central_test if central_test else math.nan
    row: dict[str, Any] = {
        "seed": seed,
        f"max_drop_after_round_{after}": fed_drop,
        "drop_round": fed_at,
        f"central_max_drop_after_round_{after}": central_drop,
        f"per_hospital_max_drop_after_round_{after}": per_hospital_drop,
        "fed_test": fed_test,
        "fed_test_low": federated.metrics.get(f"test/{metric}-low", math.nan),
        "fed_test_high": federated.metrics.get(f"test/{metric}-high", math.nan),
        "central_test": central_test,
        "central_test_low": centralized.metrics.get(f"test/{metric}-low", math.nan),
        "central_test_high": centralized.metrics.get(f"test/{metric}-high", math.nan),
        "ratio": ratio,
        "passes": bool(fed_drop <= MAX_DROP and ratio >= MIN_RATIO),
    }
    for site in range(profile.sites):
        for name, run in ((FEDERATED, federated), (CENTRALIZED, centralized)):
            short = "fed" if name == FEDERATED else "central"
            row[f"{short}_site{site}_test"] = run.metrics.get(
                f"test/site/site-{site}/{metric}", math.nan
            )
    row.update(
        {
            "metric": f"test/{metric}",
            "fed_wall_s": round(federated.wall_s, 1),
            "central_wall_s": round(centralized.wall_s, 1),
            "fed_run_id": federated.run_id,
            "central_run_id": centralized.run_id,
        }
    )
    return row
