"""Site loading throughput: the first epoch decodes every image, later epochs read the cache.

Writes a 2D and a 3D synthetic site to a temporary folder (``radfl synth``), then times a full
pass over each site's ``SiteDataset`` three times: pass 1 decodes and preprocesses (MONAI
readers, normalisation, resizing) and fills the persistent cache; passes 2 and 3 read it.

Run: ``python -m simulations.bench.loading [--samples 200] [--image-size 64] [--volume-size 32]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from client.data import SiteDataset, read_manifest
from simulations.synth import FederationSpec, write_federation


def time_passes(site: Path, *, spatial_dims: int, image_size: int, passes: int) -> list[float]:
    """Images per second of each full pass over the site."""
    rows = read_manifest(site, "classification")
    dataset = SiteDataset(
        rows,
        site,
        task="classification",
        spatial_dims=spatial_dims,
        image_size=image_size,
        cache_dir=site / ".bench-cache",
    )
    rates = []
    for _ in range(passes):
        started = time.perf_counter()
        for index in range(len(dataset)):
            dataset[index]
        rates.append(len(dataset) / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=200, help="images per site")
    parser.add_argument("--image-size", type=int, default=64, help="2D image side (px)")
    parser.add_argument("--volume-size", type=int, default=32, help="3D volume side (voxels)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for dims, size in ((2, args.image_size), (3, args.volume_size)):
            sites = write_federation(
                Path(folder) / f"{dims}d",
                FederationSpec(
                    sites=3,
                    task="classification",
                    dims=dims,
                    seed=0,
                    samples_per_site=args.samples,
                    image_size=size,
                    num_classes=2,
                ),
            )
            # One site per format: DICOM, NIfTI, PNG (NumPy for 3D).
            for site in sites:
                fmt = _format_of(site)
                rates = time_passes(site, spatial_dims=dims, image_size=size, passes=3)
                results.append(
                    {
                        "dims": f"{dims}D",
                        "format": fmt,
                        "images": len(read_manifest(site, "classification")),
                        "first epoch img/s": rates[0],
                        "cached epoch img/s": max(rates[1:]),
                        "speed-up": max(rates[1:]) / rates[0],
                    }
                )
    table = pd.DataFrame(results)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))


def _format_of(site: Path) -> str:
    first = read_manifest(site, "classification")["image"].iloc[0]
    path = site / first
    if path.is_dir():
        return "DICOM series"
    return {".dcm": "DICOM", ".gz": "NIfTI", ".nii": "NIfTI", ".png": "PNG", ".npy": "NumPy"}.get(
        path.suffix.lower(), path.suffix
    )


if __name__ == "__main__":
    main()
