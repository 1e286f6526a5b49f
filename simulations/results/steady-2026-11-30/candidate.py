"""One default-size run of seed SEED with run-config overrides (KEY=VALUE ...): ``simulate``
or ``centralized``, into the MLflow store under OUT, as the steady part runs it.

    PYTHONPATH=. python simulations/results/steady-2026-11-30/candidate.py simulate 0 OUT \
        batch-size=16
"""

import sys
from pathlib import Path

from simulations.bench.runner import PROFILES, Runner
from simulations.bench.steady import TASK

command, seed, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
overrides = dict(item.split("=", 1) for item in sys.argv[4:])
profile = PROFILES["gpu"]
run = Runner(out).run(
    command,
    task=TASK,
    model=profile.classification_model,
    sites=profile.sites,
    rounds=profile.rounds,
    seed=seed,
    settings={**profile.run_config(), **overrides},
)
print(run.run_id, run.metrics.get("test/auc"), run.wall_s)
