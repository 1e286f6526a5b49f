"""The yardstick of ``radfl bench overhead``: federated averaging as a bare PyTorch loop.

The same synthetic sites, model, optimiser, learning rate, epochs and evaluation passes as a
``radfl simulate --in-memory`` classification run, written as plain PyTorch in one process:
no Flower, no Ray, no MLflow, no report, no checks. Sites train one after the other with all
of the machine's threads. The time ``radfl simulate`` takes beyond this loop is what RadFL
and Flower cost.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from client.site import SiteSplits, synthetic_site
from common.config import ClientConfig
from common.models import build_model


def load_sites(config: ClientConfig, count: int) -> list[SiteSplits]:
    return [synthetic_site(index, count, config) for index in range(count)]


def loader(dataset: Any, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    def collate(samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([s["image"] for s in samples])
        labels = torch.as_tensor([int(s["label"]) for s in samples])
        return images, labels

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate
    )


def _autocast(bf16: bool) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def train_epoch(
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, bf16: bool = False
) -> int:
    """One epoch of plain supervised training; returns the images seen."""
    model.train()
    loss_function = nn.CrossEntropyLoss()
    seen = 0
    for images, labels in loader:
        with _autocast(bf16):
            loss = loss_function(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(labels)
    return seen


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, bf16: bool = False) -> float:
    """Accuracy (the loop needs a forward pass over the data, not a report)."""
    model.eval()
    right = total = 0
    for images, labels in loader:
        with _autocast(bf16):
            right += int((model(images).argmax(1) == labels).sum())
        total += len(labels)
    return right / max(total, 1)


def fedavg(config: ClientConfig, sites: list[SiteSplits], rounds: int) -> dict[str, Any]:
    """``rounds`` rounds of FedAvg over ``sites``: each site trains ``local-epochs`` epochs
    (validating after each, as RadFL's trainer does), the weights are averaged by training
    images, every site evaluates the global model; plus the untrained model's evaluation before
    and the final model's validation and test evaluation after, as ``radfl simulate`` does.
    Returns the wall time of all that and of each round (training to evaluation)."""
    torch.manual_seed(config.seed)
    model = build_model(
        config.model, spatial_dims=config.spatial_dims, in_channels=1,
        out_channels=config.num_classes,
    )  # fmt: skip
    batch = config.batch_size
    train = [loader(s.train, batch, True, config.seed) for s in sites]
    validation = [loader(s.validation, 2 * batch, False) for s in sites]
    test = [loader(s.test, 2 * batch, False) for s in sites if s.test is not None]
    started = time.monotonic()
    for batches in validation:
        evaluate(model, batches)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    round_s = []
    for _ in range(rounds):
        round_started = time.monotonic()
        states, weights = [], []
        for site, batches, check in zip(sites, train, validation, strict=True):
            model.load_state_dict(global_state)
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
            )
            for _epoch in range(config.local_epochs):
                train_epoch(model, batches, optimizer)
                evaluate(model, check)
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(len(site.train))
        total = float(sum(weights))
        global_state = {
            key: sum(
                s[key].double() * (w / total) for s, w in zip(states, weights, strict=True)
            ).to(value.dtype)
            for key, value in states[0].items()
        }
        model.load_state_dict(global_state)
        for batches in validation:
            evaluate(model, batches)
        round_s.append(time.monotonic() - round_started)
    for batches in [*validation, *test]:
        evaluate(model, batches)
    return {"wall_s": time.monotonic() - started, "round_s": round_s}
