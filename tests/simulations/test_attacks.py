"""The privacy attacks at tiny size: each measured against a reference or a case that fails."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy.optimize import brentq
from scipy.stats import norm
from sklearn.metrics import roc_auc_score
from torch import nn

from client.site import normalize_intensity
from common.errors import ConfigError
from common.models import SmallCNN
from common.synthetic import make_site, site_profiles
from simulations import attacks

RADFL = str(Path(sys.executable).parent / "radfl")


def test_attack_auc_is_one_half_per_tie_by_hand():
    # Pairs (member, non-member): 3>1, 3>2, 2>1, 2=2 -> (1 + 1 + 1 + 0.5) / 4.
    assert attacks.attack_auc([3.0, 2.0], [1.0, 2.0]).auc == pytest.approx(0.875)


def test_attack_auc_equals_scikit_learn_and_its_interval_is_delong_by_pairs():
    rng = np.random.default_rng(0)
    members = rng.integers(0, 12, 40).astype(float) + 1.0  # ties on purpose
    others = rng.integers(0, 12, 55).astype(float)
    result = attacks.attack_auc(members, others)
    truth = np.r_[np.ones(40), np.zeros(55)]
    assert result.auc == pytest.approx(roc_auc_score(truth, np.r_[members, others]), abs=1e-12)
    # DeLong from the explicit pairwise kernel, independent of the rank computation.
    kernel = (members[:, None] > others[None, :]) + 0.5 * (members[:, None] == others[None, :])
    variance = kernel.mean(1).var(ddof=1) / 40 + kernel.mean(0).var(ddof=1) / 55
    half = norm.ppf(0.975) * math.sqrt(variance)
    assert (result.low, result.high) == pytest.approx((result.auc - half, result.auc + half))
    assert (result.members, result.non_members) == (40, 55)


def test_attack_auc_refuses_fewer_than_two_members_by_name():
    with pytest.raises(ConfigError, match="at least 2 members and 2 non-members, got 1 and 3"):
        attacks.attack_auc([1.0], [0.0, 1.0, 2.0])


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 2))


def test_membership_auc_is_near_one_for_a_memorising_model_and_near_half_when_unseen():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(160, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 2, (160,), generator=generator)  # random: only memory fits them
    members = (images[:16], labels[:16])
    model = _mlp(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(members[0]), members[1]).backward()
        optimizer.step()

    memorised = attacks.membership_inference(model, members, (images[16:32], labels[16:32]))
    assert memorised.loss_threshold.auc > 0.95
    assert memorised.calibrated is None
    # Two sets the model never saw, from the same distribution: nothing to tell apart.
    unseen = attacks.membership_inference(
        model, (images[32:96], labels[32:96]), (images[96:], labels[96:]), reference=_mlp(1)
    )
    for result in (unseen.loss_threshold, unseen.calibrated):
        assert result is not None
        assert abs(result.auc - 0.5) < 0.15 and result.low < 0.5 < result.high


def _synthetic_images(count: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    profile = site_profiles(1, 8, seed=0)[0]
    data = make_site(profile, index=0, image_size=size, spatial_dims=2, num_classes=2, seed=0)
    return normalize_intensity(data.images[:count]), data.labels[:count]


def test_label_is_read_from_the_bias_update_for_every_class():
    image, _ = _synthetic_images(1)
    torch.manual_seed(0)
    model = SmallCNN(2, 1, 3)
    for label in range(3):
        update = attacks.site_update(model, image, torch.tensor([label]), learning_rate=0.1)
        assert attacks.infer_label(model, update) == label


def test_secure_sum_equals_the_groups_gradient_the_attacker_models():
    images, labels = _synthetic_images(4)
    torch.manual_seed(0)
    model = SmallCNN(2, 1, 2)
    updates = [
        attacks.site_update(model, images[i : i + 2], labels[i : i + 2], 0.5) for i in (0, 2)
    ]
    summed = attacks.secure_sum(updates)
    grouped = attacks.parameter_gradients(model.eval(), images, labels, group_size=2)
    for seen, gradient in zip(summed, grouped, strict=True):
        torch.testing.assert_close(seen, -0.5 * gradient)
    with pytest.raises(ConfigError, match="4 images do not split into groups of 3"):
        attacks.parameter_gradients(model, images, labels, group_size=3)


def test_clip_and_noise_clips_to_the_norm_and_adds_noise_of_multiplier_times_clip():
    update = [torch.full((100, 100), 1.0), torch.full((10,), 1.0)]
    clipped = attacks.clip_and_noise(
        update, clip_norm=2.0, noise_multiplier=0.0, generator=torch.Generator()
    )
    assert attacks.update_norm(clipped) == pytest.approx(2.0)
    noisy = attacks.clip_and_noise(
        [torch.zeros(100_000)], clip_norm=2.0, noise_multiplier=3.0,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert float(noisy[0].std()) == pytest.approx(6.0, rel=0.02)


def _rdp_epsilon(sigma: float, delta: float) -> float:
    """Epsilon of one Gaussian release at sensitivity 1 (Mironov 2017: RDP alpha / (2 sigma^2)),
    converted with Balle et al. 2020 (Proposition 12, as Canonne, Kamath and Steinke 2020), over
    a fine grid of orders."""
    orders = np.linspace(1.001, 600.0, 200_000)
    rdp = orders / (2 * sigma**2)
    eps = rdp + np.log1p(-1 / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    return float(eps.min())


def _analytic_gaussian_sigma(epsilon: float, delta: float) -> float:
    """The smallest sigma of the exact Gaussian mechanism (Balle and Wang 2018, Theorem 8)."""

    def excess(sigma: float) -> float:
        a, b = 1 / (2 * sigma), epsilon * sigma
        return float(norm.cdf(a - b) - math.exp(epsilon) * norm.cdf(-a - b)) - delta

    return float(brentq(excess, 0.05, 100.0))


@pytest.mark.parametrize("epsilon", [1.0, 3.0, 8.0])
def test_noise_multiplier_matches_an_independent_rdp_computation_to_1_percent(epsilon: float):
    sigma = attacks.noise_multiplier(epsilon, rounds=1)
    independent = brentq(lambda s: _rdp_epsilon(s, 1e-5) - epsilon, 0.1, 50.0)
    assert sigma == pytest.approx(independent, rel=0.01)
    # RDP is never tighter than the exact mechanism; at epsilon 1 it beats the classical bound.
    assert sigma >= _analytic_gaussian_sigma(epsilon, 1e-5)
    if epsilon == 1.0:
        assert sigma < math.sqrt(2 * math.log(1.25 / 1e-5))


def test_gradient_inversion_recovers_one_image_without_protection_and_not_under_noise():
    image, label = _synthetic_images(1)
    torch.manual_seed(0)
    model = SmallCNN(2, 1, 2)
    update = attacks.site_update(model, image, label, learning_rate=0.01)
    settings = attacks.InversionSettings(iterations=120)
    inferred = torch.tensor([attacks.infer_label(model, update)])
    assert int(inferred) == int(label)
    clean = attacks.invert_gradients(model, update, inferred, (1, 16, 16), 1, settings)
    recovered = attacks.best_matches(clean, image)[0]

    noisy_update = attacks.clip_and_noise(
        update,
        clip_norm=attacks.update_norm(update),
        noise_multiplier=attacks.noise_multiplier(1.0),
        generator=torch.Generator().manual_seed(0),
    )
    noisy = attacks.invert_gradients(model, noisy_update, inferred, (1, 16, 16), 1, settings)
    blurred = attacks.best_matches(noisy, image)[0]
    print(f"SSIM clean {recovered.ssim:.3f} noisy {blurred.ssim:.3f}; "
          f"PSNR {recovered.psnr:.1f} {blurred.psnr:.1f} dB")  # fmt: skip
    assert recovered.ssim > 0.5 and recovered.psnr > 12
    assert blurred.ssim < 0.25 and recovered.ssim - blurred.ssim > 0.4


@pytest.mark.slow
def test_bench_privacy_attacks_a_real_run_and_writes_its_table_and_pictures(tmp_path: Path):
    out = tmp_path / "bench"
    done = subprocess.run(
        [RADFL, "bench", "--parts", "privacy", "--profile", "quick", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "## privacy" in done.stdout
    summary = pd.read_csv(out / "privacy_summary.csv")
    assert list(summary.columns) == [
        "attack", "setting", "metric", "none", "secagg", "dp eps=8", "chance (random start)",
    ]  # fmt: skip
    rows = pd.read_csv(out / "privacy.csv")
    membership = rows[(rows["attack"] == "membership inference") & (rows["protection"] == "none")]
    assert len(membership) == 2 and membership["value"].between(0, 1).all()
    assert (membership["low"] <= membership["value"]).all()
    assert (membership["value"] <= membership["high"]).all()
    run_id = membership["run_id"].iloc[0]  # the attacked model is a real run's, in MLflow
    assert MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_run(run_id).info.status == "FINISHED"
    inversion = rows[rows["attack"].str.startswith("gradient inversion")]
    assert set(inversion["protection"]) == {"none", "secagg", "dp eps=8", "chance (random start)"}
    assert inversion[inversion["metric"] == "ssim"]["value"].between(-1, 1).all()
    for picture in ("privacy_membership.png", "privacy_inversion_batch1.png"):
        assert (out / picture).stat().st_size > 1000
