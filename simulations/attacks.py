"""Privacy attacks measured on RadFL's models: membership inference and gradient inversion.

Plain PyTorch and NumPy (no Flower, no MLflow): each attack takes a model and data, so it is
tested without a federation; ``simulations.bench.privacy`` (``radfl bench`` part ``privacy``)
feeds it a real run.

- **Membership inference**, loss threshold: Yeom, Giacomelli, Fredrikson and Jha, "Privacy
  Risk in Machine Learning: Analyzing the Connection to Overfitting", CSF 2018. A sample is
  called a member when the model's loss on it is low; the attack's quality over every threshold
  is the AUC of the score ``-loss`` for members against non-members. The calibrated variant
  subtracts the loss of a reference model the attacker holds anyway (the global model before
  training, which the server sent), as in Watson, Guo, Cormode and Sablayrolles, "On the
  Importance of Difficulty Calibration in Membership Inference Attacks", ICLR 2022; no shadow
  models. Intervals are DeLong's (DeLong, DeLong and Clarke-Pearson, Biometrics 1988).
- **Gradient inversion**: Geiping, Bauermeister, Dröge and Moeller, "Inverting Gradients - How
  easy is it to break privacy in federated learning?", NeurIPS 2020: Adam on a dummy image
  minimising one minus the cosine similarity between its parameter gradient and the observed
  one, plus a total-variation prior. The label of a single image is read from the update of the
  last layer's bias, as in iDLG (Zhao, Mopuri and Bilen, 2020): with cross-entropy, only the
  true class has a negative bias gradient.
- **Protections** on the update the attacker sees: SecAgg (the server holds only the sum of the
  sites' updates) and update-level differential privacy (the update clipped to an L2 norm and
  Gaussian noise added at the site, with the noise multiplier Opacus' RDP accountant gives for
  a target epsilon at delta after a number of rounds).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric
from scipy.stats import norm, rankdata
from torch import nn
from torch.nn import functional

from common.errors import ConfigError

#: The delta of every epsilon reported here.
DELTA = 1e-5
#: Renyi orders the accountant minimises over: Opacus' defaults stop at 63, too low for the
#: noise multipliers its search tries for a single release at small epsilon.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + list(range(64, 513, 8))


# ----------------------------------------------------------------- membership inference
@dataclass(frozen=True)
class AttackAUC:
    """The AUC of a membership score, with its DeLong interval."""

    auc: float
    low: float
    high: float
    members: int
    non_members: int


def attack_auc(
    member_scores: Sequence[float] | np.ndarray,
    non_member_scores: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
) -> AttackAUC:
    """AUC of ``score`` separating members (higher) from non-members, and its DeLong interval.

    The AUC is the Mann-Whitney statistic with ties counted one half (equal to scikit-learn's
    ``roc_auc_score``); its variance is DeLong's from the structural components of each group.
    """
    members = np.asarray(member_scores, dtype=np.float64)
    others = np.asarray(non_member_scores, dtype=np.float64)
    if len(members) < 2 or len(others) < 2:
        raise ConfigError(
            f"membership AUC needs at least 2 members and 2 non-members, got {len(members)} "
            f"and {len(others)}"
        )
    if not (np.isfinite(members).all() and np.isfinite(others).all()):
        raise ConfigError("membership scores must be finite")
    m, n = len(members), len(others)
    together = rankdata(np.concatenate([members, others]))
    rank_in_members = rankdata(members)
    rank_in_others = rankdata(others)
    # Placements: the share of the other group each sample beats (ties count one half).
    v_members = (together[:m] - rank_in_members) / n
    v_others = 1.0 - (together[m:] - rank_in_others) / m
    auc = float(v_members.mean())
    variance = v_members.var(ddof=1) / m + v_others.var(ddof=1) / n
    half = norm.ppf(0.5 + confidence / 2) * math.sqrt(max(variance, 0.0))
    return AttackAUC(auc, max(0.0, auc - half), min(1.0, auc + half), m, n)


@torch.no_grad()
def per_sample_loss(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 64
) -> np.ndarray:
    """Cross-entropy of each sample under ``model`` in evaluation mode."""
    model.eval()
    losses = []
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size]).float()
        losses.append(
            functional.cross_entropy(logits, labels[start : start + batch_size], reduction="none")
        )
    return torch.cat(losses).cpu().numpy().astype(np.float64)


@dataclass(frozen=True)
class MembershipResult:
    """Both attacks on one model, and the scores behind them (for histograms)."""

    loss_threshold: AttackAUC
    calibrated: AttackAUC | None
    member_loss: np.ndarray
    non_member_loss: np.ndarray


def membership_inference(
    model: nn.Module,
    members: tuple[torch.Tensor, torch.Tensor],
    non_members: tuple[torch.Tensor, torch.Tensor],
    reference: nn.Module | None = None,
) -> MembershipResult:
    """Loss-threshold attack (score ``-loss``) on ``model``; with a ``reference`` model also the
    calibrated attack (score ``reference loss - model loss``).

    ``members`` and ``non_members`` are ``(images, labels)``: samples the model was trained on
    and samples of the same distribution it never saw.
    """
    member_loss = per_sample_loss(model, *members)
    other_loss = per_sample_loss(model, *non_members)
    calibrated = None
    if reference is not None:
        member_ref = per_sample_loss(reference, *members)
        other_ref = per_sample_loss(reference, *non_members)
        calibrated = attack_auc(member_ref - member_loss, other_ref - other_loss)
    return MembershipResult(
        attack_auc(-member_loss, -other_loss), calibrated, member_loss, other_loss
    )


# ----------------------------------------------------------------- updates and protections
def parameter_gradients(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    group_size: int,
    *,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    """Sum over groups of ``group_size`` samples of each group's mean cross-entropy gradient.

    Each group is forwarded on its own, as each site forwards its own batch (batch
    normalisation sees only that group): one group is one site's batch, several groups are what
    a sum over sites adds up.
    """
    if group_size < 1 or len(images) % group_size:
        raise ConfigError(f"{len(images)} images do not split into groups of {group_size}")
    parameters = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in parameters]
    for start in range(0, len(images), group_size):
        logits = model(images[start : start + group_size])
        loss = functional.cross_entropy(logits, labels[start : start + group_size])
        grads = torch.autograd.grad(loss, parameters, create_graph=create_graph)
        total = [a + b for a, b in zip(total, grads, strict=True)]
    return total


def site_update(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    learning_rate: float,
    *,
    train_mode: bool = False,
) -> list[torch.Tensor]:
    """What one site sends after one local SGD step on its batch from the global ``model``:
    new weights minus global weights, per trainable parameter. The model is not changed.

    ``train_mode``: batch normalisation uses the batch's own statistics (how RadFL's trainer
    runs); by default the global model's running statistics are used (frozen statistics, the
    setting of Geiping et al.). On a batch of one image, batch statistics normalise most of the
    image away: 300 iterations here reached SSIM 0.3 with them and 0.94 without.
    """
    local = copy.deepcopy(model).train(train_mode)
    grads = parameter_gradients(local, images, labels, group_size=len(images))
    return [-learning_rate * g.detach() for g in grads]


def update_norm(update: Sequence[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((u.double() ** 2).sum() for u in update)))  # type: ignore[arg-type]


def noise_multiplier(epsilon: float, *, rounds: int = 1, delta: float = DELTA) -> float:
    """The Gaussian noise multiplier for ``(epsilon, delta)`` after ``rounds`` releases of a
    clipped update (every round, sampling rate 1), from Opacus' RDP accountant."""
    from opacus.accountants.utils import get_noise_multiplier

    if epsilon <= 0 or not 0 < delta < 1 or rounds < 1:
        raise ConfigError(
            f"need epsilon > 0, 0 < delta < 1 and rounds >= 1; got epsilon={epsilon}, "
            f"delta={delta}, rounds={rounds}"
        )
    return float(
        get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=1.0, steps=rounds,
            epsilon_tolerance=0.001, alphas=RDP_ORDERS,
        )
    )  # fmt: skip


def clip_and_noise(
    update: Sequence[torch.Tensor],
    *,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """Update-level DP at the site: scale ``update`` to L2 norm at most ``clip_norm``, then add
    Gaussian noise of standard deviation ``noise_multiplier * clip_norm`` to every entry."""
    if clip_norm <= 0 or noise_multiplier < 0:
        raise ConfigError(
            f"need clip_norm > 0 and noise_multiplier >= 0; got {clip_norm}, {noise_multiplier}"
        )
    scale = min(1.0, clip_norm / max(update_norm(update), 1e-12))
    std = noise_multiplier * clip_norm
    return [
        u * scale + std * torch.randn(u.shape, generator=generator, dtype=u.dtype) for u in update
    ]


def secure_sum(updates: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """What SecAgg reveals to the server: the sum of the sites' updates, nothing per site."""
    return [torch.stack(parts).sum(dim=0) for parts in zip(*updates, strict=True)]


def infer_label(model: nn.Module, update: Sequence[torch.Tensor]) -> int:
    """iDLG: the label of a single-image update from the last linear layer's bias.

    The bias gradient of softmax cross-entropy is ``p - onehot(y)``, negative only at the true
    class; an SGD update is minus the learning rate times the gradient, so the true class is
    the largest entry of the bias update.
    """
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear or f"{linear[-1]}.bias" not in names:
        raise ConfigError("infer_label needs a model whose last linear layer has a bias")
    bias_update = update[names.index(f"{linear[-1]}.bias")]
    return int(torch.argmax(bias_update))


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (anisotropic total variation)."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return dx + dy


@dataclass(frozen=True)
class InversionSettings:
    """The attacker's budget and prior (Geiping et al. 2020's recipe, shortened)."""

    iterations: int = 300
    learning_rate: float = 0.1
    tv_weight: float = 0.01
    seed: int = 0
    #: Batch normalisation with the batch's statistics, as the site ran (``site_update``).
    train_mode: bool = False


def invert_gradients(
    model: nn.Module,
    observed_update: Sequence[torch.Tensor],
    labels: torch.Tensor,
    image_shape: tuple[int, ...],
    group_size: int,
    settings: InversionSettings = InversionSettings(),
) -> torch.Tensor:
    """Reconstruct ``len(labels)`` images of ``image_shape`` (``C, H, W``) whose update, as
    ``parameter_gradients`` with ``group_size`` forms it, points the way ``observed_update``
    does.

    An SGD update is minus the gradient times a learning rate; cosine similarity ignores the
    scale, so the attacker needs neither the learning rate nor the number of images. Adam
    steps on the sign of the image gradient, with the learning rate divided by 10 at 3/8, 5/8
    and 7/8 of the iterations, as in Geiping et al.'s implementation.
    """
    attacked = copy.deepcopy(model).train(settings.train_mode)
    for parameter in attacked.parameters():
        parameter.requires_grad_(True)
    target = [-u.detach() for u in observed_update]
    target_norm = torch.sqrt(sum((t**2).sum() for t in target))  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(settings.seed)
    dummy = torch.randn((len(labels), *image_shape), generator=generator).requires_grad_(True)
    optimizer = torch.optim.Adam([dummy], lr=settings.learning_rate)
    milestones = [int(settings.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    for _ in range(settings.iterations):
        optimizer.zero_grad()
        grads = parameter_gradients(attacked, dummy, labels, group_size, create_graph=True)
        dot = sum((g * t).sum() for g, t in zip(grads, target, strict=True))
        grad_norm = torch.sqrt(sum((g**2).sum() for g in grads))  # type: ignore[arg-type]
        cosine = dot / (grad_norm * target_norm + 1e-12)
        loss = 1 - cosine + settings.tv_weight * total_variation(dummy)
        loss.backward()  # type: ignore[union-attr]
        dummy.grad.sign_()  # type: ignore[union-attr]
        optimizer.step()
        schedule.step()
    return dummy.detach()


@dataclass(frozen=True)
class Similarity:
    """How close a reconstruction is to the true image it best matches."""

    psnr: float
    ssim: float


def image_similarity(reconstructed: torch.Tensor, true: torch.Tensor) -> Similarity:
    """PSNR (dB) and SSIM (MONAI, 7-pixel window) of one 2D image ``(C, H, W)`` against the
    true one, both mapped by the true image's min-max to ``[0, 1]`` (the reconstruction clamped
    to it)."""
    low, high = float(true.min()), float(true.max())
    span = max(high - low, 1e-12)
    y = ((true - low) / span).unsqueeze(0).float()
    y_pred = ((reconstructed - low) / span).clamp(0, 1).unsqueeze(0).float()
    window = min(7, *true.shape[1:])
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=window)(y_pred, y)
    psnr = PSNRMetric(max_val=1.0)(y_pred, y)
    return Similarity(float(psnr.mean()), float(ssim.mean()))  # type: ignore[union-attr]


def best_matches(reconstructed: torch.Tensor, true: torch.Tensor) -> list[Similarity]:
    """For each true image, the reconstruction closest to it by SSIM: the order of images in a
    batch or in a sum over sites is not revealed, so the attacker gets the best match."""
    out = []
    for image in true:
        scores = [image_similarity(candidate, image) for candidate in reconstructed]
        out.append(max(scores, key=lambda s: s.ssim))
    return out
