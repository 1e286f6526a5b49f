"""Local training throughput in fp32 and with bf16 autocast, on this machine's CPU (or GPU).

Decides what ``precision = "auto"`` means on CPU: bf16 autocast only pays where the CPU has
native bf16 matrix units (AMX/AVX512-BF16); elsewhere it is emulated and slower.

Run: ``python -m simulations.bench.precision [--model resnet18] [--image-size 64]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from common.models import build_model


def images_per_second(
    model_name: str, image_size: int, batch_size: int, dtype: torch.dtype | None, repeats: int
) -> float:
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(model_name, spatial_dims=2, in_channels=1, out_channels=2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(batch_size, 1, image_size, image_size, device=device)
    labels = torch.randint(0, 2, (batch_size,), device=device)
    loss_function = torch.nn.CrossEntropyLoss()

    def step() -> None:
        context = torch.autocast(device_type=device.type, dtype=dtype) if dtype else nullcontext()
        with context:
            loss = loss_function(model(images).float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    return batch_size / statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(
        f"threads {torch.get_num_threads()}, {args.model} {args.image_size}px "
        f"batch {args.batch_size}"
    )
    results: dict[str, list[float]] = {}
    # Alternate the two settings so drift in machine speed hits both alike.
    for _ in range(2):
        for label, dtype in (("fp32", None), ("bf16-autocast", torch.bfloat16)):
            value = images_per_second(
                args.model, args.image_size, args.batch_size, dtype, args.repeats
            )
            results.setdefault(label, []).append(value)
    print(f"{'precision':<15}{'img/s (median of runs)':>24}")
    for label, values in results.items():
        print(f"{label:<15}{statistics.median(values):>24.1f}")
    ratio = statistics.median(results["bf16-autocast"]) / statistics.median(results["fp32"])
    print(f"bf16/fp32 throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
