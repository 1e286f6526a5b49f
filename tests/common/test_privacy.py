"""DP-SGD's accountant against a plain computation of the sampled Gaussian mechanism, and the
network both sides build for DP-SGD."""

import copy
import math

import numpy as np
import pytest
import torch

from common.config import ClientConfig, default_run_config, from_run_config
from common.errors import ConfigError
from common.privacy import RDP_ORDERS, PrivacyLedger, private_model
from common.tasks import get_task


def _rdp_sampled_gaussian(q: float, sigma: float, order: int) -> float:
    """RDP of one step of the Poisson-sampled Gaussian mechanism at an integer order
    (Mironov, Talwar and Zhang 2019, Sec. 3.3): log of the binomial expansion
    sum_k C(a, k) (1 - q)^(a - k) q^k exp((k^2 - k) / (2 sigma^2)), over a - 1."""
    if q == 1.0:
        return order / (2 * sigma**2)
    terms = [
        math.lgamma(order + 1)
        - math.lgamma(k + 1)
        - math.lgamma(order - k + 1)
        + (order - k) * math.log1p(-q)
        + k * math.log(q)
        + (k * k - k) / (2 * sigma**2)
        for k in range(order + 1)
    ]
    top = max(terms)
    return (top + math.log(sum(math.exp(t - top) for t in terms))) / (order - 1)


def _epsilon(phases: list[tuple[float, float, int]], delta: float) -> float:
    """RDP composed over phases, converted to (epsilon, delta) by Balle et al. (2020, Thm 21)."""
    best = math.inf
    for order in RDP_ORDERS:
        rdp = sum(steps * _rdp_sampled_gaussian(q, sigma, order) for sigma, q, steps in phases)
        eps = rdp - (math.log(delta) + math.log(order)) / (order - 1)
        eps += math.log((order - 1) / order)
        best = min(best, eps)
    return best


@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [(1.1, 0.01, 1000), (0.8, 0.05, 120), (2.0, 0.2, 30), (1.0, 1.0, 5)],
)
def test_the_site_epsilon_matches_an_independent_accountant_to_one_percent(sigma, q, steps):
    ledger = PrivacyLedger()
    ledger.add(sigma, q, steps)
    expected = _epsilon([(sigma, q, steps)], 1e-5)
    assert ledger.epsilon(1e-5) == pytest.approx(expected, rel=0.01)


def test_rounds_compose_and_a_ledger_survives_the_context_state():
    ledger = PrivacyLedger()
    assert ledger.epsilon(1e-5) == 0.0
    ledger.add(1.0, 0.1, 40)
    ledger.add(1.5, 0.05, 80)
    expected = _epsilon([(1.0, 0.1, 40), (1.5, 0.05, 80)], 1e-6)
    assert ledger.epsilon(1e-6) == pytest.approx(expected, rel=0.01)
    again = PrivacyLedger.from_record(ledger.to_record())
    assert again.epsilon(1e-6) == ledger.epsilon(1e-6)
    assert ledger.epsilon_after(1.0, 0.1, 40, 1e-6) > ledger.epsilon(1e-6)


def test_the_dp_network_has_group_norm_for_batch_norm_on_both_sides():
    values = {**default_run_config(), "model": "small-cnn", "image-size": 32}
    config = from_run_config(ClientConfig, values)
    plain = get_task(config.model_config).build_model()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    server, site = (private_model(get_task(config.model_config).build_model()) for _ in range(2))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in site.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in site.modules())
    assert server.state_dict().keys() == site.state_dict().keys()
    assert not any("running_mean" in k for k in site.state_dict())
    out = site(torch.zeros(2, 1, 32, 32))
    assert out.shape == (2, 2) and np.isfinite(out.detach().numpy()).all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dp-noise-multiplier": -1.0}, "dp-noise-multiplier and dp-epsilon must be >= 0"),
        ({"dp-delta": 1.0}, "dp-delta must lie in"),
        ({"dp-max-grad-norm": 0.0}, "dp-max-grad-norm must be positive"),
        ({"dp-noise-multiplier": 1.0, "class-balancing": "sampler"}, "Poisson sampling"),
    ],
)
def test_bad_dp_settings_name_their_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        from_run_config(ClientConfig, {**default_run_config(), **overrides})


def test_resnet18_takes_a_dp_sgd_step_and_computes_the_same_function():
    # MONAI's ResNet blocks add the residual in place, which Opacus' per-sample hooks forbid
    # ("Output 0 of BackwardHookFunction is a view and is being modified inplace").
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    config = from_run_config(
        ClientConfig, {**default_run_config(), "model": "resnet18", "image-size": 32}
    )
    torch.manual_seed(0)
    reference = ModuleValidator.fix(get_task(config.model_config).build_model())
    for module in reference.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    model = private_model(copy.deepcopy(reference))
    images = torch.randn(3, 1, 32, 32)
    reference.eval()
    model.eval()
    assert torch.allclose(reference(images), model(images))
    model.train()
    wrapped = GradSampleModule(model)
    wrapped(images).sum().backward()
    grads = [p.grad_sample for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.shape[0] == 3 and torch.isfinite(g).all() for g in grads)
