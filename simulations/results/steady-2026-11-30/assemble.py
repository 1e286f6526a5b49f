"""Rebuild steady.csv / steady_rounds.csv from runs made side by side (2026-11-30).

On the shared 2-core machine (load 13-25) the part's six sequential default-size runs would not
finish in time, so each seed's ``radfl bench --parts steady --profile gpu --seeds S`` ran its
federated run while ``central.py`` ran the same seed's ``radfl centralized`` beside it (same
profile settings, same Runner); the bench was stopped when it reached its own centralized run.
This script applies the part's own functions (``simulations.bench.steady.seed_row`` and
``curve``) to those MLflow runs.

    PYTHONPATH=. python simulations/results/steady-2026-11-30/assemble.py OUT \
        FED_STORE_DIR,CENTRAL_STORE_DIR,SEED ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from common.tasks import task_class
from simulations.bench.runner import EXPERIMENT, PROFILES, RunResult
from simulations.bench.steady import CENTRALIZED, FEDERATED, TASK, curve, seed_row


def finished(store: Path, mode: str, seed: int) -> RunResult:
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("radfl.mode") == mode
        and r.data.params.get("seed") == str(seed)
        and r.info.status == "FINISHED"
    ]
    if len(runs) != 1:
        raise SystemExit(f"{store}: {len(runs)} finished {mode} runs of seed {seed}")
    run = runs[0]
    wall = (run.info.end_time - run.info.start_time) / 1000
    return RunResult(run.info.run_id, dict(run.data.metrics), wall, client)


def main() -> None:
    out = Path(sys.argv[1])
    profile = PROFILES["gpu"]
    metric = task_class(TASK).primary_metric
    rows, curves = [], []
    for spec in sys.argv[2:]:
        fed_dir, central_dir, seed_text = spec.split(",")
        seed = int(seed_text)
        runs = {
            FEDERATED: finished(Path(fed_dir), "federated", seed),
            CENTRALIZED: finished(Path(central_dir), "centralized", seed),
        }
        for training, run in runs.items():
            for step, value in curve(run, f"pooled/{metric}"):
                curves.append(
                    {
                        "seed": seed,
                        "training": training,
                        "round": step,
                        "pooled_validation": value,
                        "run_id": run.run_id,
                    }
                )
        rows.append(seed_row(profile, seed, runs[FEDERATED], runs[CENTRALIZED], metric))
    pd.DataFrame(rows).to_csv(out / "steady.csv", index=False)
    pd.DataFrame(curves).to_csv(out / "steady_rounds.csv", index=False)
    print(pd.DataFrame(rows).T.to_string())
    wide = pd.DataFrame(curves).pivot_table(
        index="round", columns=["seed", "training"], values="pooled_validation"
    )
    print(wide.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
