"""``radfl synth``: write synthetic hospitals to disk (``simulations.synth`` generates them)."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from common import manifest
from simulations.synth import TASKS, FederationSpec, site_format, write_federation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder to write site-<i>/ into")
    parser.add_argument("--sites", type=int, default=3, help="number of hospitals")
    parser.add_argument(
        "--task", choices=TASKS, default="classification", help="which labels to write"
    )
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2D images or volumes")
    parser.add_argument("--seed", type=int, default=0, help="seed of all generated data")
    parser.add_argument(
        "--samples-per-site",
        type=int,
        default=300,
        help="typical studies per site (sites hold 0.6 to 1.4 times this)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=64,
        help="nominal matrix size; each site's native size is within 25%% of it",
    )
    parser.add_argument(
        "--num-classes", type=int, default=2, help="classes including 0 = no finding"
    )
    parser.add_argument(
        "--hide-labels",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="leave the labels of this share of the training split's patients blank: "
        "unlabelled studies for pseudo-labelling (the split of the default run config and "
        "split-seed 0; validation and test rows keep theirs)",
    )


def synth(args: argparse.Namespace) -> int:
    """Write the federation ``args`` describe; print one line per site."""
    spec = FederationSpec(
        sites=args.sites,
        task=args.task,
        dims=args.dims,
        seed=args.seed,
        samples_per_site=args.samples_per_site,
        image_size=args.image_size,
        num_classes=args.num_classes,
        hidden_label_fraction=args.hide_labels,
    )
    folders = write_federation(args.out, spec)
    for index, folder in enumerate(folders):
        fmt = site_format(index, args.dims)
        with (folder / manifest.MANIFEST_NAME).open(newline="") as handle:
            cells = [row[manifest.LABEL] for row in csv.DictReader(handle)]
        labels = np.asarray([int(c) for c in cells if c])
        note = " (PNG cannot hold 3D)" if fmt.name == "npy" else ""
        hidden = f", {len(cells) - len(labels)} unlabelled" if len(labels) < len(cells) else ""
        print(
            f"{folder}  {fmt.name} {fmt.modality}{note}  {len(cells)} rows{hidden}  "
            f"prevalence {np.mean(labels > 0):.2f}"
        )
    return 0
