"""Time ResNet stems: MONAI's default (7x7 stride 1) against RadFL's (:data:`RESNET_STEM`).

Run ``python -m simulations.bench.stems``. For resnet18 and resnet50 at 64 and 128 px (2D,
batch 16, 1 channel, 2 classes) it prints the forward + backward time of one training batch
(median over a few repeats after warm-up) and the throughput in images per second. The numbers
behind the stem choice documented in :mod:`common.models` come from this script.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Mapping
from typing import Any, Final

import torch
from torch import nn

from common.models import RESNET_STEM, build_model

#: MONAI 1.6 ``ResNet`` defaults, spelled out so the comparison does not depend on RadFL's choice.
MONAI_DEFAULT_STEM: Final[Mapping[str, Any]] = {
    "conv1_t_size": 7,
    "conv1_t_stride": 1,
    "no_max_pool": False,
}


def _train_step_ms(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    nn.functional.cross_entropy(model(images), labels).backward()
    return (time.perf_counter() - start) * 1000.0


def time_train_steps_ms(
    models: dict[str, nn.Module],
    *,
    batch_size: int,
    image_size_px: int,
    num_warmup: int,
    num_repeats: int,
) -> dict[str, float]:
    """Return the median wall time of one forward + backward pass of each model, in milliseconds.

    The models take turns within each repeat, so that a slow spell of a shared machine slows
    all of them alike instead of biasing one.

    Parameters
    ----------
    models
        2D classifiers taking one input channel and giving two logits, by label.
    batch_size
        Images per batch.
    image_size_px
        Height and width of each image.
    num_warmup
        Untimed rounds first (allocator and kernel selection).
    num_repeats
        Timed rounds; the median is returned.

    Returns
    -------
    dict[str, float]
        Median time per batch in milliseconds, by the labels of ``models``.

    Raises
    ------
    ValueError
        If ``num_repeats`` is below 1 or ``num_warmup`` is negative.
    """
    if num_repeats < 1:
        raise ValueError(f"num_repeats must be at least 1, got {num_repeats}")
    if num_warmup < 0:
        raise ValueError(f"num_warmup must not be negative, got {num_warmup}")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 1, image_size_px, image_size_px, generator=generator)
    labels = torch.randint(0, 2, (batch_size,), generator=generator)
    for model in models.values():
        model.train()
    times_ms: dict[str, list[float]] = {label: [] for label in models}
    for round_index in range(num_warmup + num_repeats):
        for label, model in models.items():
            elapsed_ms = _train_step_ms(model, images, labels)
            if round_index >= num_warmup:
                times_ms[label].append(elapsed_ms)
    return {label: statistics.median(values) for label, values in times_ms.items()}


def main(argv: list[str] | None = None) -> None:
    """Print the stem timing table.

    Parameters
    ----------
    argv
        Command-line arguments; ``sys.argv[1:]`` when None.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-warmup", type=int, default=1)
    parser.add_argument("--num-repeats", type=int, default=3)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.num_threads)
    torch.manual_seed(0)
    stems = {"monai-default 7x7 s1": MONAI_DEFAULT_STEM, "radfl 7x7 s2": RESNET_STEM}
    print(
        f"forward+backward, 2D, batch {args.batch_size}, 1 channel, 2 classes, "
        f"{torch.get_num_threads()} threads, median of {args.num_repeats} "
        f"after {args.num_warmup} warm-up, stems interleaved"
    )
    header = f"{'model':<10}{'px':>5}  {'stem':<22}{'ms/batch':>10}{'img/s':>9}{'speed-up':>10}"
    print(header)
    print("-" * len(header))
    for model_name in ("resnet18", "resnet50"):
        for image_size_px in (64, 128):
            models = {
                stem_name: build_model(
                    model_name, spatial_dims=2, in_channels=1, out_channels=2, **stem
                )
                for stem_name, stem in stems.items()
            }
            medians_ms = time_train_steps_ms(
                models,
                batch_size=args.batch_size,
                image_size_px=image_size_px,
                num_warmup=args.num_warmup,
                num_repeats=args.num_repeats,
            )
            baseline_ms = medians_ms["monai-default 7x7 s1"]
            for stem_name, ms in medians_ms.items():
                images_per_s = args.batch_size / (ms / 1000.0)
                print(
                    f"{model_name:<10}{image_size_px:>5}  {stem_name:<22}{ms:>10.0f}"
                    f"{images_per_s:>9.1f}{baseline_ms / ms:>9.1f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
