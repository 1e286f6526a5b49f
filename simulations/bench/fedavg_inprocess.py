"""FedAvg of the synthetic hospitals in one process, on a GPU when there is one.

The same tasks, networks, local trainer and summable metric states as ``radfl simulate``, with
the Flower and MLflow machinery left out, so a default-size 3D run fits where Flower's
simulation engine (Ray) cannot be installed: a borrowed GPU machine. Sites train one after the
other on the same device; the server averages their weights by training examples (integer
buffers keep their dtype), evaluates the pooled validation split every round, and evaluates the
best round's model once on the pooled test split. Prints one JSON line per round and a summary.

    python -m simulations.bench.fedavg_inprocess --task detection --dims 3 --image-size 32
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch

from client.site import load_site
from client.trainer import LocalTrainer
from common.config import ClientConfig, default_run_config, from_run_config, parse_overrides
from common.tasks import get_task, task_class


def average(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    out = {}
    for key, first in states[0].items():
        mixed = torch.zeros(first.shape, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            mixed += state[key].double() * (weight / total)
        out[key] = (mixed if first.is_floating_point() else mixed.round()).to(first.dtype)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="detection")
    parser.add_argument("--dims", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-seconds", type=float, default=math.inf, help="stop starting rounds after this"
    )
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.set:
        overrides = parse_overrides(args.set)

    values: dict[str, Any] = {
        **default_run_config(),
        "task": args.task,
        "model": task_class(args.task).default_model,
        "spatial-dims": args.dims,
        "image-size": args.image_size,
        "seed": args.seed,
        **overrides,
    }
    config = from_run_config(ClientConfig, values)
    task = get_task(config.model_config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.monotonic()
    sites = [
        load_site({"partition-id": i, "num-partitions": args.sites}, config)
        for i in range(args.sites)
    ]
    trainers = [LocalTrainer.for_site(task, config, site, device=device) for site in sites]
    model = task.build_model()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}

    def pooled(state: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        records = []
        for trainer, site in zip(trainers, sites, strict=True):
            model.load_state_dict(state)
            dataset = site.test if split == "test" else None
            records.append(trainer.evaluate(model, dataset).to_record())
        return task.pool(records).compute()

    primary = task.primary_metric
    untrained = pooled(global_state, "validation")
    print(json.dumps({"round": 0, "validation": untrained, "device": str(device)}), flush=True)
    best = (-math.inf, 0, global_state)
    for server_round in range(1, args.rounds + 1):
        states, weights = [], []
        for trainer in trainers:
            local = task.build_model()
            local.load_state_dict(global_state)
            result = trainer.fit(local, server_round=server_round, num_rounds=args.rounds)
            states.append({k: v.detach().cpu() for k, v in local.state_dict().items()})
            weights.append(result.num_examples)
        global_state = average(states, weights)
        scores = pooled(global_state, "validation")
        if math.isfinite(scores[primary]) and scores[primary] > best[0]:
            best = (scores[primary], server_round, {k: v.clone() for k, v in global_state.items()})
        elapsed = time.monotonic() - started
        print(json.dumps({"round": server_round, "s": round(elapsed, 1), "validation": scores}),
              flush=True)  # fmt: skip
        if elapsed > args.max_seconds:
            break
    rounds_run = server_round
    test = pooled(best[2], "test")
    untrained_test = pooled(
        {k: v.clone() for k, v in task.build_model().state_dict().items()}, "test"
    )
    print(
        json.dumps(
            {
                "summary": True,
                "task": args.task,
                "dims": args.dims,
                "image_size": args.image_size,
                "rounds": rounds_run,
                "best_round": best[1],
                "test": test,
                "untrained_test": untrained_test,
                "wall_s": round(time.monotonic() - started, 1),
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
