"""`radfl bench --parts startup` times each phase of a run by the output line that ends it."""

from __future__ import annotations

from simulations.bench import startup

#: The lines of a real `radfl simulate --verbose` run (in this process) that end phases, with
#: the lines around them that must not.
IN_PROCESS_OUTPUT = [
    "RadFL simulation: 3 sites, 1 rounds, resnet18, fedavg, seed 0; data in memory",
    "INFO :      [radfl] MLflow run 12af1398 at sqlite:////tmp/mlflow.db",
    "INFO :      Starting Flower Simulation",
    "INFO :      [radfl] 3 sites: site-0, site-1, site-2",
    "INFO :      [radfl] untrained model: pooled auc 0.4028",
    "INFO :      [ROUND 1/1]",
    "INFO :      [radfl] round 1/1: train loss 0.7218 | pooled auc 0.5000",
    "INFO :      [radfl] final evaluation of the best model (round 1)",
    "INFO :      [radfl] test auc n/a, sensitivity n/a, specificity 1.000 (0.701 to 1.000)",
    "Successfully registered model 'radfl-classification-resnet18-2d'.",
    "INFO :      [radfl] finished; MLflow run 12af1398",
    "Pooled validation metrics per round (MLflow run 12af1398):",
]


def test_each_phase_lasts_from_the_line_ending_the_one_before_to_its_own():
    now = [0.0]
    clock = startup.PhaseClock(now=lambda: now[0])  # started at 0
    for second, line in enumerate(IN_PROCESS_OUTPUT, start=1):  # line i arrives at i + 1 s
        now[0] = float(second)
        clock(line)
    phases = clock.durations(wall_s=20.0)
    assert list(phases) == [name for name, _ in startup.PHASES]
    assert phases["imports, config, synthetic data"] == 1.0
    # A SuperLink's steps did not happen: empty, and the next phase starts where they would.
    assert phases["SuperLink start, app build, flwr run submit"] is None
    assert phases["app install into FLWR_HOME"] is None
    assert phases["ServerApp start, MLflow store and run"] == 1.0
    assert phases["Ray and ClientApp start, first message"] == 2.0
    assert phases["untrained model's evaluation"] == 1.0
    assert phases["the round: training and evaluation"] == 3.0
    assert phases["final evaluation and report"] == 1.0
    assert phases["model logging"] == 2.0
    assert phases["shutdown, summary, overlays"] == 9.0  # to the process's end at 20 s
    assert sum(v for v in phases.values() if v is not None) == 20.0
