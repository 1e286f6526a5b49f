"""Per-round pooled and per-site validation AUC, train loss per site, of runs in MLflow stores
(finished or not), long: one row per store, run, metric and round.

    PYTHONPATH=. python simulations/results/steady-2026-11-30/curves.py OUT.csv LABEL=STORE ...
"""

import sys
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from simulations.bench.runner import EXPERIMENT

rows = []
for spec in sys.argv[2:]:
    label, store = spec.split("=", 1)
    client = MlflowClient(f"sqlite:///{Path(store) / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise SystemExit(f"{store}: no MLflow experiment {EXPERIMENT!r}")
    for run in client.search_runs([experiment.experiment_id]):
        names = [
            k
            for k in run.data.metrics
            if k in ("pooled/auc", "train/loss")
            or (k.startswith("site/") and k.endswith(("/auc", "/train-loss")))
        ]
        for name in names:
            for m in client.get_metric_history(run.info.run_id, name):
                rows.append(
                    {
                        "label": label,
                        "mode": run.data.tags.get("radfl.mode"),
                        "seed": run.data.params.get("seed"),
                        "status": run.info.status,
                        "metric": name,
                        "round": m.step,
                        "value": m.value,
                        "run_id": run.info.run_id,
                    }
                )
table = pd.DataFrame(rows).sort_values(["label", "run_id", "metric", "round"])
table.to_csv(sys.argv[1], index=False)
wide = table[table["metric"].str.endswith("auc")].pivot_table(
    index="round", columns=["label", "seed", "metric"], values="value"
)
print(wide.round(3).to_string())
