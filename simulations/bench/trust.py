"""Measure the trust states at a small size: MC dropout against the plain entropy, temperature
scaling, and attention inside the lesion with and without a planted shortcut.

``python -m simulations.bench.trust [--samples 600] [--epochs 8] [--model small-cnn]``

One synthetic hospital in memory (``common.synthetic``), split by patient; the same network
is trained with the site's own trainer (``client.trainer``) on it as generated and on the same
site with a corner marker planted (``plant_shortcut``: on 90% of positives and 10% of
negatives), and evaluated on the test split through the final evaluation's path
(``evaluate_cells``: the same states a federated run sends). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

from client.site import split_fractions, split_site
from client.trainer import LocalTrainer
from common import uncertainty as unc
from common.config import ClientConfig, default_run_config, from_run_config
from common.metrics import ClassificationStates
from common.subgroups import SubgroupSpec
from common.synthetic import make_site, plant_shortcut, site_profiles
from common.tasks import get_task
from common.tasks.classification import ClassificationTask

#: Referred shares at which the selective AUCs of the two uncertainty methods are compared.
SHARES = (0.1, 0.2, 0.3)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {
        "model": args.model,
        "image-size": args.image_size,
        "local-epochs": args.epochs,
        "batch-size": 32,
        "synthetic-samples-per-site": args.samples,
        "early-stopping-patience": 0,
        "seed": args.seed,
    }
    config = from_run_config(ClientConfig, {**default_run_config(), **overrides})
    task = get_task(config.model_config)
    if not isinstance(task, ClassificationTask):
        raise ValueError("the trust measurement is for classification")
    profile = site_profiles(1, args.samples, args.seed)[0]
    data = make_site(
        profile,
        index=0,
        image_size=args.image_size,
        spatial_dims=2,
        num_classes=2,
        seed=args.seed,
        follow_up_studies=True,
    )
    results: dict[str, Any] = {"settings": overrides}
    for name, site_data in (("clean", data), ("shortcut", plant_shortcut(data, args.seed))):
        site = split_site(site_data, split_fractions(config), args.seed, task)
        trainer = LocalTrainer.for_site(task, config, site, device=torch.device("cpu"))
        model = task.build_model()
        started = time.monotonic()
        trainer.fit(model)
        trained_s = time.monotonic() - started
        row: dict[str, Any] = {"train_s": round(trained_s, 1)}
        assert site.test is not None
        # What a map spread evenly over the image would put inside the lesion.
        lesions = torch.stack([site.test[i]["lesion"] for i in range(len(site.test))])
        lesions = lesions.flatten(1).float()
        has = lesions.sum(1) > 0
        row["uniform_map_share"] = float((lesions[has] > 0).float().mean(1).mean())
        for method in unc.METHODS if args.compare else ("mc-dropout",):
            task.uncertainty = method
            started = time.monotonic()
            validation = trainer.evaluate_cells(model, site.validation, SubgroupSpec(()))
            test = trainer.evaluate_cells(model, site.test, SubgroupSpec(()))
            evaluated_s = time.monotonic() - started
            row[method] = _summary(validation.overall, test.overall, evaluated_s)  # type: ignore[arg-type]
        results[name] = row
    return results


def _summary(
    validation: ClassificationStates, test: ClassificationStates, evaluated_s: float
) -> dict[str, Any]:
    temperature = validation.fitted_temperature()
    trust = test.trust("test", temperature, 0.5, 0.95)
    assert trust is not None
    curve = trust.selective
    out: dict[str, Any] = {
        "cases": trust.count,
        "auc": test.compute()["auc"],
        "temperature": temperature,
        "ece_before": trust.ece_before,
        "ece_after": trust.ece_after,
        "attention": [trust.attention.value, trust.attention.low, trust.attention.high],
        "attention_cases": trust.attention.n,
        "evaluate_s": round(evaluated_s, 1),
        # Mean AUC of the kept cases over every cut-off up to 30% referred: one number that
        # rewards an uncertainty which refers the cases the model gets wrong.
        "selective_auc_mean_to_30": float(
            np.nanmean([r["auc"] for r in curve if r["referred_share"] <= 0.3])
        ),
    }
    for share in SHARES:
        row = next((r for r in curve if r["referred_share"] >= share), None)
        if row is not None:
            out[f"refer{int(100 * share)}"] = {
                "referred": round(row["referred_share"], 3),
                "auc": row["auc"],
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench.trust")
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--model", default="small-cnn")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compare", action="store_true", help="also evaluate the plain entropy (uncertainty)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(json.dumps(measure(args), indent=1))


if __name__ == "__main__":
    main()
