"""Per-case uncertainty of a classifier: MC dropout over the head, or the plain entropy.

MC dropout (Gal and Ghahramani, "Dropout as a Bayesian approximation", ICML 2016) averages
the softmax of several stochastic forward passes with dropout active and takes the predictive
entropy of the mean. RadFL's classification networks (MONAI ResNets, the small CNN) have no
dropout layer of their own, so dropout at rate :data:`MC_DROPOUT_RATE` is applied to the
input of the final linear layer (the pooled features), the only place it can go without
retraining; the features are computed once and only the head is sampled
(:data:`MC_DROPOUT_SAMPLES` passes), which makes it cheap. Normalisation layers stay in eval
mode.

``"entropy"`` is the predictive entropy of the deterministic output (no sampling): the
baseline that MC dropout must beat to be worth its passes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Method = Literal["mc-dropout", "entropy"]
METHODS: tuple[Method, ...] = ("mc-dropout", "entropy")
MC_DROPOUT_RATE = 0.3
MC_DROPOUT_SAMPLES = 16


def final_linear(model: nn.Module) -> nn.Linear:
    """The network's last ``nn.Linear`` (its classification head)."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no linear head for MC dropout")
    return found[-1]


def predictive_probabilities(
    model: nn.Module,
    images: torch.Tensor,
    method: Method,
    *,
    samples: int = MC_DROPOUT_SAMPLES,
    rate: float = MC_DROPOUT_RATE,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, probabilities)`` of a batch: the deterministic logits (eval mode) and the
    probabilities whose entropy is the case's uncertainty (``method``)."""
    if method not in METHODS:
        raise ValueError(f"uncertainty method {method!r}; known: {', '.join(METHODS)}")
    head = final_linear(model)
    features: list[torch.Tensor] = []

    def keep_input(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        features.append(args[0].detach())

    handle = head.register_forward_pre_hook(keep_input)
    try:
        logits = model(images).float()
    finally:
        handle.remove()
    if method == "entropy":
        return logits, torch.softmax(logits, dim=1)
    generator = torch.Generator(device=features[-1].device).manual_seed(seed)
    pooled = features[-1].float()
    total = torch.zeros_like(logits)
    for _ in range(samples):
        keep = torch.rand(pooled.shape, generator=generator, device=pooled.device) >= rate
        dropped = pooled * keep / (1.0 - rate)
        sampled = nn.functional.linear(dropped, head.weight.float(), head.bias.float())
        total += torch.softmax(sampled, dim=1)
    return logits, total / samples
