"""``radfl bench``: is federated learning worth it here, and what does it cost?

Each part runs real ``radfl simulate`` / ``radfl centralized`` runs (or, for overhead, a bare
PyTorch loop beside them) on the synthetic hospitals, prints a table, and writes
``PART.csv`` and ``PART.json`` to ``--out``. Every federated or pooled number comes from an
MLflow run in ``--out/mlflow.db`` whose id is in the table.

- ``quality``: pooled training, each site alone (cross-site validation) and federated with
  each strategy, per seed; classification AUC and segmentation Dice; median and range.
- ``overhead``: wall time of ``radfl simulate`` against a bare PyTorch FedAvg loop doing the
  same training on the same data (alternating), and the site trainer's throughput against a
  bare epoch, fp32 and bf16 autocast.
- ``scale``: round time and peak memory (the whole process tree) with more and more sites.
- ``comm``: bytes each site sends per round, fp32 and with compressed updates, and what
  compression costs in test AUC.
- ``privacy``: membership inference on a run's final model and gradient inversion of one
  site's update, without protection, with update-level DP and with SecAgg
  (``simulations.bench.privacy``).
- ``privacy-utility``: test AUC and Dice without DP, with DP-SGD and with update-level DP at
  epsilon 1, 3 and 8, and with SecAgg, with the epsilon each run reached
  (``simulations.bench.utility``).
- ``startup``: the fixed cost of a one-round ``radfl simulate``, phase by phase, and a small
  workload against ``radfl centralized`` on the same images (``simulations.bench.startup``).
- ``steady``: per seed, the federated pooled validation curve's largest drop below its running
  best after round 5, and the final test AUC against ``radfl centralized`` on the same seed
  (``simulations.bench.steady``).

Profiles size the runs (``simulations.bench.runner``, with the runner that launches each one):
``quick`` (seconds per run: CI checks that the tables are produced), ``cpu`` (this 2-core
machine) and ``gpu`` (the default data and image size).

    radfl bench --parts quality,comm --profile cpu --out bench/
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from io import StringIO
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from common.tasks import task_class
from simulations.bench.runner import PROFILES, BenchError, Profile, Runner, RunResult


# ----------------------------------------------------------------------------- parts
def quality(profile: Profile, runner: Runner) -> pd.DataFrame:
    """Test metric of pooled, federated (each strategy) and local-only training, per seed."""
    rows = []
    for task in profile.tasks:
        # The test metric each task is compared by (MLflow ``test/NAME``).
        primary = task_class(task).primary_metric
        common = {
            "task": task,
            "model": profile.model(task),
            "sites": profile.sites,
            "rounds": profile.rounds,
            "settings": profile.run_config(),
        }
        for seed in profile.seeds:
            pooled = runner.run("centralized", seed=seed, **common)  # type: ignore[arg-type]
            rows.append(_quality_row(task, "pooled", seed, pooled, f"test/{primary}"))
            for strategy in profile.strategies:
                options = ["--strategy", strategy]
                if strategy == profile.strategies[0]:
                    options.append("--cross-site")  # local-only models, trained alongside
                result = runner.run("simulate", seed=seed, options=options, **common)  # type: ignore[arg-type]
                rows.append(_quality_row(task, strategy, seed, result, f"test/{primary}"))
                if "--cross-site" in options:
                    rows += _local_rows(task, seed, result)
    return pd.DataFrame(rows)


def _quality_row(task: str, config: str, seed: int, run: RunResult, metric: str) -> dict:
    return {
        "task": task,
        "training": config,
        "seed": seed,
        "metric": metric,
        "value": run.metrics.get(metric, float("nan")),
        "wall_s": round(run.wall_s, 1),
        "run_id": run.run_id,
    }


def _local_rows(task: str, seed: int, run: RunResult) -> list[dict]:
    """Cross-site validation: each model's mean validation metric over every site."""
    text = run.artifact_text("report/cross_site.csv")
    if text is None:
        raise BenchError(f"run {run.run_id} has no report/cross_site.csv")
    table = pd.read_csv(StringIO(text)).set_index("model")
    local = table[table.index.str.startswith("local:")].mean(axis=1)
    base = {"task": task, "seed": seed, "metric": "validation, mean over sites", "wall_s": ""}
    return [
        {**base, "training": "local-only (mean of sites)", "value": float(local.mean()),
         "run_id": run.run_id},
        {**base, "training": "federated (same view)",
         "value": float(table.loc["federated"].mean()), "run_id": run.run_id},
    ]  # fmt: skip


def quality_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Median and range over seeds, and each federated strategy against pooled training."""
    out = []
    for (task, training, metric), group in rows.groupby(["task", "training", "metric"], sort=False):
        values = group["value"].astype(float).tolist()
        out.append(
            {
                "task": task,
                "training": training,
                "metric": metric,
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "seeds": len(values),
            }
        )
    table = pd.DataFrame(out)
    for task in table["task"].unique():
        mine = table["task"] == task
        pooled = table[mine & (table["training"] == "pooled")]["median"]
        if len(pooled):
            table.loc[mine, "x_pooled"] = table.loc[mine, "median"] / float(pooled.iloc[0])
        same_view = table[mine & (table["training"] == "federated (same view)")]["median"]
        local = table[mine & (table["training"] == "local-only (mean of sites)")]["median"]
        if len(same_view) and len(local):
            table.loc[mine & (table["training"] == "federated (same view)"), "gain_over_local"] = (
                float(same_view.iloc[0]) / float(local.iloc[0]) - 1.0
            )
    return table


def comm(profile: Profile, runner: Runner) -> pd.DataFrame:
    """Bytes per site per round, and the test metric, for each update compression."""
    metric = f"test/{task_class(profile.comm_task).primary_metric}"
    rows = []
    for method in profile.compressions:
        run = runner.run(
            "simulate",
            task=profile.comm_task,
            model=profile.model(profile.comm_task),
            sites=profile.sites,
            rounds=profile.rounds,
            seed=profile.seeds[0],
            settings={**profile.run_config(), "update-compression": method},
        )
        sent = run.history("traffic/update-bytes")
        model_bytes = run.metrics.get("traffic/model-bytes", float("nan"))
        mean_sent = statistics.fmean(sent) if sent else float("nan")
        rows.append(
            {
                "compression": method,
                "bytes_per_site_round": round(mean_sent),
                "fp32_model_bytes": round(model_bytes),
                "x_fp32": mean_sent / model_bytes,
                "metric": metric,
                "value": run.metrics.get(metric, float("nan")),
                "run_id": run.run_id,
            }
        )
    table = pd.DataFrame(rows)
    table["change_points"] = 100 * (table["value"] - table["value"].iloc[0])
    return table


def overhead(profile: Profile, runner: Runner) -> pd.DataFrame:
    """Wall time of ``radfl simulate --in-memory`` against the bare loop, alternating, and the
    site trainer's throughput against a bare training epoch, in fp32 and bf16."""
    from simulations.bench import bare_loop

    settings = {**profile.run_config(), "augment": False, "precision": "fp32"}
    config = _client_config(profile, settings)
    rows = []
    for repeat in range(profile.overhead_repeats):
        started = time.monotonic()
        sites = bare_loop.load_sites(config, profile.sites)
        bare = bare_loop.fedavg(config, sites, profile.rounds)
        bare_total = time.monotonic() - started
        run = runner.run(
            "simulate",
            task="classification",
            model=profile.classification_model,
            sites=profile.sites,
            rounds=profile.rounds,
            seed=profile.seeds[0],
            settings=settings,
            options=["--in-memory", "--cpus-per-site", "1"],
        )
        radfl_rounds = round_times(run)
        rows.append(
            {
                "measure": "radfl simulate / bare FedAvg loop (wall time)",
                "repeat": repeat,
                "radfl_s": round(run.wall_s, 2),
                "bare_s": round(bare_total, 2),
                "ratio": run.wall_s / bare_total,
                "note": f"bare loop {bare['wall_s']:.1f} s training + evaluation, rest is data; "
                f"radfl outside its rounds {run.wall_s - sum(radfl_rounds):.1f} s (start-up, "
                "final evaluation, report, model logging)",
                "run_id": run.run_id,
            }
        )
        radfl_round = statistics.median(radfl_rounds) if radfl_rounds else float("nan")
        bare_round = statistics.median(bare["round_s"])
        rows.append(
            {
                "measure": "one round, radfl / bare loop (median, training to evaluation)",
                "repeat": repeat,
                "radfl_s": round(radfl_round, 2),
                "bare_s": round(bare_round, 2),
                "ratio": radfl_round / bare_round,
                "note": f"{len(radfl_rounds)} radfl rounds, {len(bare['round_s'])} bare rounds",
                "run_id": run.run_id,
            }
        )
    rows += _throughput(profile, config)
    return pd.DataFrame(rows)


def round_times(run: RunResult) -> list[float]:
    """Seconds each round of a federated run took, training to pooled evaluation: the gaps
    between the MLflow timestamps of successive rounds' ``pooled/loss`` (round 0 is the
    untrained model's evaluation)."""
    history = sorted(run.client.get_metric_history(run.run_id, "pooled/loss"), key=lambda m: m.step)
    stamps = [m.timestamp / 1000 for m in history]
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def _throughput(profile: Profile, config: Any) -> list[dict[str, Any]]:
    """Images per second of one site's local training: RadFL's trainer against a bare epoch."""
    from client.trainer import LocalTrainer
    from common.tasks import get_task
    from simulations.bench import bare_loop

    site = bare_loop.load_sites(config, profile.sites)[0]
    task = get_task(config.model_config)
    rows = []
    for precision in ("fp32", "bf16"):
        local = replace(config, precision=precision, local_epochs=1)
        trainer = LocalTrainer.for_site(task, local, site)
        timings: dict[str, list[float]] = {"radfl": [], "bare": []}
        for _ in range(max(2, profile.throughput_repeats)):  # alternate; the first warms up
            model = task.build_model()
            started = time.monotonic()
            trainer.fit(model)
            timings["radfl"].append(time.monotonic() - started)
            model = task.build_model()
            optimizer = torch.optim.AdamW(model.parameters(), lr=local.learning_rate)
            loader = bare_loop.loader(site.train, local.batch_size, True)
            check = bare_loop.loader(site.validation, 2 * local.batch_size, False)
            started = time.monotonic()
            bare_loop.train_epoch(model, loader, optimizer, bf16=precision == "bf16")
            bare_loop.evaluate(model, check, bf16=precision == "bf16")
            timings["bare"].append(time.monotonic() - started)
        radfl_s = statistics.median(timings["radfl"][1:])
        bare_s = statistics.median(timings["bare"][1:])
        rows.append(
            {
                "measure": f"site training throughput, {precision} (images/s, 1 epoch)",
                "repeat": "median",
                "radfl_s": round(radfl_s, 3),
                "bare_s": round(bare_s, 3),
                "ratio": bare_s / radfl_s,  # throughput ratio: radfl / bare
                "note": f"radfl {len(site.train) / radfl_s:.1f} img/s, bare "
                f"{len(site.train) / bare_s:.1f} img/s; ratio is throughput",
                "run_id": "",
            }
        )
    return rows


def _client_config(profile: Profile, settings: Mapping[str, Any]) -> Any:
    from common.config import ClientConfig, default_run_config, from_run_config

    values = {
        **default_run_config(),
        "model": profile.classification_model,
        "seed": profile.seeds[0],
        **settings,
    }
    return from_run_config(ClientConfig, values)


def scale(profile: Profile, runner: Runner) -> pd.DataFrame:
    """Round time and peak memory of the whole simulation with more and more sites, for each
    of ``scale_strategies``."""
    rows = []
    settings = {**profile.run_config(), "synthetic-samples-per-site": profile.scale_samples}
    for strategy in profile.scale_strategies:
        for sites in profile.scale_sites:
            run = runner.run(
                "simulate",
                task="classification",
                model=profile.classification_model,
                sites=sites,
                rounds=profile.scale_rounds,
                seed=profile.seeds[0],
                settings={**settings, "strategy": strategy},
                options=["--in-memory"],
                measure_memory=True,
            )
            rounds = round_times(run)
            rows.append(
                {
                    "strategy": strategy,
                    "sites": sites,
                    "round_s": statistics.median(rounds) if rounds else float("nan"),
                    "wall_s": round(run.wall_s, 1),
                    "peak_memory_mb": round(run.peak_memory / 2**20),
                    "run_id": run.run_id,
                }
            )
    table = pd.DataFrame(rows)
    first = table.groupby("strategy")[["sites", "peak_memory_mb"]].transform("first")
    table["memory_per_added_site_mb"] = (table["peak_memory_mb"] - first["peak_memory_mb"]) / (
        table["sites"] - first["sites"]
    ).where(table["sites"] != first["sites"])
    table["memory_vs_fewest_sites"] = table["peak_memory_mb"] / first["peak_memory_mb"]
    return table


def privacy(profile: Profile, runner: Runner) -> pd.DataFrame:
    """Membership-inference AUC and gradient-inversion SSIM/PSNR, per protection."""
    from simulations.bench import privacy as bench_privacy

    return bench_privacy.privacy(profile, runner)


def privacy_summary(rows: pd.DataFrame) -> pd.DataFrame:
    from simulations.bench import privacy as bench_privacy

    return bench_privacy.summary(rows)


def privacy_utility(profile: Profile, runner: Runner) -> pd.DataFrame:
    """Test metric, epsilon reached and wall time of each privacy mode (no DP, DP-SGD and
    update-level DP at epsilon 1, 3, 8, SecAgg); ``--modes`` (``runner.modes``) picks some."""
    from simulations.bench import utility

    return utility.privacy_utility(profile, runner, runner.modes)


def startup(profile: Profile, runner: Runner) -> pd.DataFrame:
    """Phase profile and whole-process time of a one-round run; small workload / pooled."""
    from simulations.bench import startup as bench_startup

    return bench_startup.startup(profile, runner)


def steady(profile: Profile, runner: Runner) -> pd.DataFrame:
    """Per seed: the federated validation curve's largest drop after the first rounds, and
    the final test AUC against pooled training's on the same seed (issue 22)."""
    from simulations.bench import steady as bench_steady

    return bench_steady.steady(profile, runner)


PARTS: dict[str, Callable[[Profile, Runner], pd.DataFrame]] = {
    "quality": quality,
    "overhead": overhead,
    "scale": scale,
    "comm": comm,
    "privacy": privacy,
    "privacy-utility": privacy_utility,
    "startup": startup,
    "steady": steady,
}
SUMMARIES: dict[str, Callable[[pd.DataFrame], pd.DataFrame]] = {
    "quality": quality_summary,
    "privacy": privacy_summary,
}


def bench(args: argparse.Namespace) -> int:
    profile = PROFILES[args.profile]
    if args.tasks:
        profile = replace(profile, tasks=tuple(t.strip() for t in args.tasks.split(",")))
    if args.seeds:
        profile = replace(profile, seeds=_seeds(args.seeds))
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise BenchError(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    runner = Runner(Path(args.out), verbose=args.verbose)
    runner.modes = tuple(m.strip() for m in (args.modes or "").split(",") if m.strip())
    print(f"radfl bench: profile {profile.name} ({json.dumps(asdict(profile))})", flush=True)
    begun = time.monotonic()
    for part in parts:
        started = time.monotonic()
        table = PARTS[part](profile, runner)
        write(runner.out, part, table)
        if part in SUMMARIES:
            table = SUMMARIES[part](table)
            write(runner.out, f"{part}_summary", table)
        print(f"\n## {part} ({time.monotonic() - started:.0f} s)\n", flush=True)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
    print(
        f"\nTotal {time.monotonic() - begun:.0f} s. Tables in {runner.out}; runs in MLflow at "
        f"{runner.tracking_uri}"
    )
    return 0


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise BenchError(f"--seeds {text!r}: give whole numbers, e.g. 0,1,2") from None


def write(out: Path, name: str, table: pd.DataFrame) -> None:
    table.to_csv(out / f"{name}.csv", index=False)
    (out / f"{name}.json").write_text(table.to_json(orient="records", indent=1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", default=",".join(PARTS), help=f"of {', '.join(PARTS)}")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--out", default="bench", help="folder for tables and the MLflow store")
    parser.add_argument("--verbose", action="store_true", help="show each run's output")
    parser.add_argument("--tasks", default="", help="tasks of the profile to run (default: all)")
    parser.add_argument(
        "--seeds",
        default="",
        help="seeds to run instead of the profile's, e.g. 1,2 (one seed per process runs "
        "seeds side by side, each with its own --out)",
    )
    parser.add_argument(
        "--modes",
        default="",
        help="privacy-utility: modes to run, e.g. none,dp-sgd-eps8 (default: all)",
    )
