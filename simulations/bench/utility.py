"""``radfl bench --parts privacy-utility``: what each privacy mode costs in test quality.

Each mode is one dict of run-config overrides on a ``radfl simulate --in-memory`` run of the
profile's size (:func:`modes`): ``none``; sample-level DP-SGD at epsilon 1, 3 and 8 (the noise
multiplier from Opacus' accountant for the profile's sampling rate and steps, as the privacy
part does); update-level DP at epsilon 1, 3 and 8 (the noise multiplier whose site-level
epsilon after the profile's rounds is the target, ``common.privacy.UpdateAccountant``, with the
target also set as the run's budget); and ``secagg`` (``secure-aggregation = true``), run only
when this tree's run config has that key (the SecAgg+ branch), else written as not run.

Writes ``privacy-utility.csv``: per task and mode, the test metric (AUC for classification,
per-case Dice for segmentation) with its interval, the epsilon the run reports it reached (the
largest site's for DP-SGD), wall time and MLflow run id. ``--modes`` picks modes by name.
"""

from __future__ import annotations

import csv
import io
import json
from typing import TYPE_CHECKING, Any

import pandas as pd

from client.site import synthetic_site
from common.config import ClientConfig, default_run_config, from_run_config, known_keys
from common.privacy import UpdateAccountant
from common.tasks import task_class
from simulations import attacks
from simulations.bench.privacy import _dp_sgd_noise

if TYPE_CHECKING:
    from simulations.bench.runner import Profile, Runner, RunResult

#: The secure-aggregation switch of the SecAgg+ branch (issue 17 item 3).
SECAGG_KEY = "secure-aggregation"
EPSILONS = (1.0, 3.0, 8.0)


def modes(profile: Profile, task: str, model: str) -> dict[str, dict[str, Any]]:
    """Mode name -> the run-config overrides that turn it on, for ``task`` at ``profile``'s
    size (the DP noise depends on the rounds, steps and sampling rates)."""
    out: dict[str, dict[str, Any]] = {"none": {}}
    config = _client_config(profile, task, model)
    sites = [synthetic_site(i, profile.sites, config) for i in range(profile.sites)]
    for epsilon in EPSILONS:
        sigma = _dp_sgd_noise(epsilon, sites, config, profile)
        out[f"dp-sgd-eps{epsilon:g}"] = {
            "dp-noise-multiplier": round(sigma, 4),
            "dp-delta": attacks.DELTA,
        }
    for epsilon in EPSILONS:
        accountant = UpdateAccountant.for_budget(epsilon, profile.rounds, 1.0, attacks.DELTA)
        out[f"update-dp-eps{epsilon:g}"] = {
            "dp-update-noise-multiplier": round(accountant.noise_multiplier + 5e-5, 4),
            "dp-update-clip-norm": 1.0,
            "dp-update-epsilon": epsilon,
            "dp-delta": attacks.DELTA,
        }
    out["secagg"] = {SECAGG_KEY: True}
    return out


def privacy_utility(
    profile: Profile, runner: Runner, selected: tuple[str, ...] = ()
) -> pd.DataFrame:
    """One row per task and mode (``selected``: these modes only)."""
    rows = []
    for task in profile.tasks:
        model = profile.model(task)
        for name, settings in modes(profile, task, model).items():
            if selected and name not in selected:
                continue
            rows.append(_row(profile, runner, task, model, name, settings))
            print(f"[radfl] privacy-utility: {task} {name}: {rows[-1]['value']:.4f}", flush=True)
    return pd.DataFrame(rows)


def _row(
    profile: Profile,
    runner: Runner,
    task: str,
    model: str,
    name: str,
    settings: dict[str, Any],
) -> dict[str, Any]:
    # The test metric each task is compared by (MLflow ``test/NAME``, ``-low``/``-high``).
    metric = task_class(task).primary_metric
    row: dict[str, Any] = {
        "task": task,
        "mode": name,
        "metric": f"test/{metric}",
        "size": (
            f"{profile.sites} sites x {profile.samples_per_site} images at "
            f"{profile.image_size} px, {profile.rounds} rounds x {profile.local_epochs} epochs, "
            f"{model}, seed {profile.seeds[0]}"
        ),
        "settings": json.dumps(settings),
    }
    if any(key not in known_keys() for key in settings):
        return {
            **row,
            "value": float("nan"),
            "note": f"not run: this tree has no run-config key {', '.join(settings)}",
        }
    from simulations.bench.runner import BenchError

    try:
        run = runner.run(
            "simulate",
            task=task,
            model=model,
            sites=profile.sites,
            rounds=profile.rounds,
            seed=profile.seeds[0],
            settings={**profile.run_config(), **settings},
            options=["--in-memory"],
        )
    except BenchError as exc:  # one failed cell must not lose the others' hours
        log = runner.out / f"failed-{task}-{name}.log"
        log.write_text(str(exc))
        return {**row, "value": float("nan"), "note": f"failed: {failure_note(str(exc))}; {log}"}
    site_epsilons = [v for k, v in run.metrics.items() if k.endswith("/dp-epsilon")]
    epsilon = (
        run.metrics.get("dp-update/epsilon-final")
        if "dp-update-noise-multiplier" in settings
        else max(site_epsilons)
        if site_epsilons
        else None
    )
    return {
        **row,
        "value": run.metrics.get(f"test/{metric}", float("nan")),
        "low": run.metrics.get(f"test/{metric}-low", float("nan")),
        "high": run.metrics.get(f"test/{metric}-high", float("nan")),
        "epsilon": epsilon if epsilon is not None else float("nan"),
        "delta": settings.get("dp-delta", float("nan")),
        "wall_s": round(run.wall_s, 1),
        "run_id": run.run_id,
        "note": degraded_note(run),
    }


def _client_config(profile: Profile, task: str, model: str) -> ClientConfig:
    values = {
        **default_run_config(),
        **profile.run_config(),
        "task": task,
        "model": model,
        "seed": profile.seeds[0],
    }
    return from_run_config(ClientConfig, values)


def failure_note(error: str) -> str:
    """A failed run's command line and its cause: the last output line naming an error (the
    line a user would look for), else the output's last line."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    if len(lines) < 2:
        return lines[0] if lines else "no output"
    cause = next((line for line in reversed(lines[1:]) if "error" in line.lower()), lines[-1])
    return f"{lines[0]} {cause}"


def degraded_note(run: RunResult) -> str:
    """What went wrong in a run that still finished, so that its cell is not read as the
    mode's effect: rounds that failed (the global model kept), sites left out, sites whose
    final evaluation failed ("" when none). A secagg cell measured while a site's worker was
    killed for memory read AUC 0.5, an untrained model, with nothing on the table saying so."""
    notes = []
    failed = sum(1 for value in run.history("round/failed") if value > 0)
    if failed:
        notes.append(f"{failed} round(s) failed, the global model kept")
    rejections = run.artifact_text("robustness/rejections.csv") or ""
    left_out = sorted(
        {
            row["site"]
            for row in csv.DictReader(io.StringIO(rejections))
            if row.get("reason", "").startswith("left out")
        }
    )
    if left_out:
        notes.append(f"left out: {', '.join(left_out)}")
    final = run.client.get_run(run.run_id).data.tags.get("radfl.final-evaluation-failed")
    if final:
        notes.append(f"final evaluation failed at {final}")
    return "; ".join(notes) + (" (robustness/rejections.csv of the run)" if notes else "")
