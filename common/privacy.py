"""Sample-level differential privacy at a site: DP-SGD with Opacus, and its RDP accountant.

References
----------
M. Abadi et al., "Deep learning with differential privacy", CCS 2016 (DP-SGD: per-sample
clipping to ``max_grad_norm``, Gaussian noise of ``noise_multiplier * max_grad_norm``, Poisson
sampling of each batch).

I. Mironov, K. Talwar and L. Zhang, "Renyi differential privacy of the sampled Gaussian
mechanism", arXiv:1908.10530, 2019 (the accountant).

B. Balle et al., "Hypothesis testing interpretations and Renyi differential privacy", AISTATS
2020 (RDP to (epsilon, delta), Theorem 21).

A site that trains with ``dp-noise-multiplier > 0`` keeps a :class:`PrivacyLedger` of every
DP-SGD step it took in the run (noise multiplier, sampling rate, steps) and reports the epsilon
it has spent at ``dp-delta`` after each round. The unit of privacy is one image (one study):
a patient with ``m`` studies at the site is protected at ``(m epsilon, m e^((m-1) epsilon)
delta)`` by group privacy, so each site also reports its largest ``m``.

Update-level (site-level) DP is the other mode (``dp-update-noise-multiplier > 0``; H. B.
McMahan et al., "Learning differentially private recurrent language models", ICLR 2018,
DP-FedAvg): each site clips its whole update to ``dp-update-clip-norm`` before it leaves
(Flower's ``fixedclipping_mod``), the server takes the unweighted mean over the fixed number of
sites it sampled and adds Gaussian noise of ``noise_multiplier * clip / sampled``
(``server.strategies.UpdateDP``). One round is then one step of the sampled Gaussian mechanism
whose unit is a whole site, at sampling rate ``sampled / sites``; :class:`UpdateAccountant`
composes the rounds with the same RDP machinery. A patient with several studies, or several
patients, are all inside one site's unit: the guarantee covers whatever a site holds at once.
With ``fraction-train < 1`` Flower samples a fixed number of sites without replacement, and the
Poisson-sampling bound used here is the customary approximation of it, not a proof; with every
site in every round (``fraction-train = 1``, the default) the rate is 1 and the bound is exact.

Epsilon is taken over the integer RDP orders 2..255: slightly looser than with Opacus' default
fractional orders too, and checkable against a plain computation of the sampled Gaussian
mechanism (``tests/common/test_privacy.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError

if TYPE_CHECKING:  # torch is not needed to read a ledger
    from torch import nn

#: MLflow tags of a run whose update-level DP budget stopped training: why, and the rounds
#: trained (what a complete run then has).
BUDGET_STOP_TAG = "radfl.dp-update-budget-stop"
ROUNDS_TRAINED_TAG = "radfl.dp-update-rounds-trained"

#: RDP orders epsilon is minimised over.
RDP_ORDERS: tuple[int, ...] = tuple(range(2, 256))


def private_model(model: nn.Module) -> nn.Module:
    """The model with every layer DP-SGD cannot train per sample replaced (BatchNorm by
    GroupNorm, through Opacus' validator), no in-place activation and no in-place residual
    addition. Server and sites build
    the same network this way.
    """
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(model)
    # Opacus' per-sample hooks see every layer's output: an in-place activation would change
    # it under them (a RuntimeError in backward).
    for module in fixed.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    from common.private_resnet import OUT_OF_PLACE

    for module in fixed.modules():
        # In-place residual additions break Opacus' per-sample hooks (common/private_resnet.py):
        # the same block, computing the same function out of place.
        twin = OUT_OF_PLACE.get(type(module))
        if twin is not None:
            module.__class__ = twin
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise ConfigError(
            f"dp-noise-multiplier: the model cannot be trained with DP-SGD: {errors[0]}"
        )
    return fixed


@dataclass
class PrivacyLedger:
    """Every DP-SGD phase a site ran in one run: ``(noise_multiplier, sample_rate, steps)``."""

    history: list[tuple[float, float, int]] = field(default_factory=list)

    def add(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        if steps > 0:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any step)."""
        return epsilon_of(self.history, delta)

    def epsilon_after(
        self, noise_multiplier: float, sample_rate: float, steps: int, delta: float
    ) -> float:
        """Epsilon once ``steps`` more steps are taken."""
        return epsilon_of([*self.history, (noise_multiplier, sample_rate, steps)], delta)

    def to_record(self) -> dict[str, list[float] | list[int]]:
        return {
            "noise-multiplier": [h[0] for h in self.history],
            "sample-rate": [h[1] for h in self.history],
            "steps": [h[2] for h in self.history],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> PrivacyLedger:
        if not record:
            return cls()
        return cls(
            [
                (float(n), float(q), int(s))
                for n, q, s in zip(
                    record["noise-multiplier"], record["sample-rate"], record["steps"], strict=True
                )
            ]
        )


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of the composed sampled Gaussian mechanisms in ``history``."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta, alphas=list(RDP_ORDERS)))


@dataclass(frozen=True)
class UpdateAccountant:
    """Site-level epsilon of update-level DP: ``rounds`` steps of the sampled Gaussian
    mechanism with ``noise_multiplier`` at ``sample_rate`` (sites sampled per round / sites).

    Every round the sites are asked to train counts, whether or not its aggregate is released
    (a failed round keeps the global model): the epsilon reported is an upper bound.
    """

    noise_multiplier: float
    sample_rate: float
    delta: float

    def __post_init__(self) -> None:
        if self.noise_multiplier <= 0:
            raise ConfigError("dp-update-noise-multiplier must be > 0 to account for it")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ConfigError(
                f"update-level DP's sampling rate must lie in (0, 1], got {self.sample_rate}"
            )

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds (0 before the first)."""
        if rounds <= 0:
            return 0.0
        return epsilon_of([(self.noise_multiplier, self.sample_rate, rounds)], self.delta)

    @classmethod
    def for_budget(
        cls, epsilon: float, rounds: int, sample_rate: float, delta: float
    ) -> UpdateAccountant:
        """The accountant with the smallest noise multiplier (to 0.1%) whose ``rounds`` rounds
        stay within ``epsilon``: what a run config needs for a target budget."""
        if epsilon <= 0 or rounds < 1:
            raise ConfigError(f"need epsilon > 0 and rounds >= 1; got {epsilon}, {rounds}")
        low, high = 1e-3, 1.0
        while cls(high, sample_rate, delta).epsilon(rounds) > epsilon:
            low, high = high, high * 2
        while high - low > 1e-3 * high:
            middle = (low + high) / 2
            if cls(middle, sample_rate, delta).epsilon(rounds) > epsilon:
                low = middle
            else:
                high = middle
        return cls(high, sample_rate, delta)

    def affordable_rounds(self, budget: float, num_rounds: int) -> int:
        """The most rounds, up to ``num_rounds``, whose epsilon stays within ``budget``
        (``budget = 0``: no budget). Epsilon grows with the rounds, so a bisection finds it."""
        if budget <= 0 or self.epsilon(num_rounds) <= budget:
            return num_rounds
        low, high = 0, num_rounds  # epsilon(low) <= budget < epsilon(high)
        while high - low > 1:
            middle = (low + high) // 2
            if self.epsilon(middle) <= budget:
                low = middle
            else:
                high = middle
        return low
