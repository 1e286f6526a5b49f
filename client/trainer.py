"""A site's local trainer: plain PyTorch and MONAI, no Flower import.

It runs without a federation (and is tested that way); ``client/app.py`` only adapts Flower
messages to it. It handles epochs, AdamW with weight decay, a learning-rate schedule across the
federated run, early stopping on the site's validation split, class-weighted loss or balanced
sampling, MONAI augmentation, the FedProx proximal term, the freezing schedule of transfer
learning (``common.transfer.Freezing``), and mixed precision (CUDA fp16 or bf16, CPU bf16 when
asked).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from client.datasets import Augmented, ConcatLabelled, LabelledDataset, SampleDataset, Splits
from common import manifest as mf
from common.config import ClientConfig
from common.errors import ConfigError
from common.privacy import PrivacyLedger
from common.subgroups import SubgroupSpec, cell_name, withheld_cells
from common.tasks import MetricStates, Task
from common.transfer import LR_SCALE, Freezing

__all__ = [
    "Augmented",
    "CellStates",
    "ConcatLabelled",
    "FitResult",
    "LabelledDataset",
    "LocalTrainer",
    "SampleDataset",
    "learning_rate_at",
    "select_device",
]


@dataclass
class CellStates:
    """Metric states of one split, overall and per subgroup cell, ready to leave the site.

    Attributes
    ----------
    overall : MetricStates
        States over every sample of the split.
    cells : dict of str to MetricStates
        States per cell (``sex=F``) holding at least ``min_cell_size`` patients.
    patients : dict of str to int
        Distinct patients per sent cell (each at least ``min_cell_size``).
    suppressed : list of str
        Cells with fewer patients, and those withheld with them (complementary suppression):
        neither their states nor their size leave the site.
    """

    overall: MetricStates
    cells: dict[str, MetricStates]
    patients: dict[str, int]
    suppressed: list[str]


@dataclass(frozen=True)
class FitResult:
    """What one round of local training produced."""

    num_examples: int
    train_loss: float
    epochs_run: int
    validation_loss: float
    stopped_early: bool
    #: Steps skipped because reduced precision gave a non-finite loss or gradient.
    skipped_steps: int = 0


def learning_rate_at(
    base: float, schedule: str, server_round: int, num_rounds: int, progress: float
) -> float:
    """The learning rate for a step.

    ``cosine`` decays from ``base`` to 1 % of it over the whole federated run; ``cyclic``
    restarts the cosine every round (SGDR-style warm restarts); ``constant`` keeps ``base``.
    ``progress`` is the fraction of this round's local steps already taken.
    """
    if schedule == "constant":
        return base
    if schedule == "cosine":
        total = max(num_rounds, 1)
        position = (max(server_round, 1) - 1 + progress) / total
    elif schedule == "cyclic":
        position = progress
    else:
        raise ConfigError(f"unknown lr-schedule {schedule!r}")
    return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(position, 1.0))))


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LocalTrainer:
    """Trains and evaluates one site's model on the site's own data."""

    def __init__(
        self,
        task: Task,
        config: ClientConfig,
        train_set: LabelledDataset,
        validation_set: LabelledDataset,
        device: torch.device | None = None,
    ) -> None:
        if len(train_set) == 0:
            raise ValueError("the site has no training samples")
        if len(validation_set) == 0:
            raise ValueError("the site has no validation samples")
        self.task = task
        self.config = config
        self.device = device or select_device()
        self.train_labels = train_set.labels
        self.train_set: LabelledDataset = train_set
        if config.augment:
            transform = task.augmentation()
            if hasattr(transform, "set_random_state"):
                transform.set_random_state(seed=config.seed)
            self.train_set = Augmented(train_set, transform)
        self.validation_set = validation_set
        self.autocast_dtype = _autocast_dtype(config.precision, self.device)

    @classmethod
    def for_site(
        cls, task: Task, config: ClientConfig, site: Splits, device: torch.device | None = None
    ) -> LocalTrainer:
        """A trainer on a site's training split that validates on its validation split."""
        return cls(task, config, site.train, site.validation, device=device)

    def fit(
        self,
        model: nn.Module,
        *,
        server_round: int = 1,
        num_rounds: int = 1,
        proximal_mu: float = 0.0,
        ledger: PrivacyLedger | None = None,
    ) -> FitResult:
        """Train ``model`` in place for up to ``local_epochs`` epochs.

        After each epoch the validation loss is measured; training stops when it has not improved
        for ``early_stopping_patience`` epochs and the best epoch's weights are kept.

        With ``dp-noise-multiplier > 0`` it is DP-SGD (``common.privacy``): Poisson-sampled
        batches, each sample's gradient clipped to ``dp-max-grad-norm``, Gaussian noise added,
        in fp32; the steps taken are added to ``ledger``. ``model`` must come from
        :func:`common.privacy.private_model`.
        """
        cfg = self.config
        model.to(self.device)
        if cfg.private and proximal_mu > 0:
            raise ConfigError(
                "dp-noise-multiplier > 0 cannot train FedProx: the proximal term's gradient "
                "is not per sample; use another strategy"
            )
        global_params = (
            [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
        )
        loss_function = self.task.loss_function(
            self.train_labels, balance=cfg.class_balancing == "weighted-loss"
        ).to(self.device)
        freezing = Freezing.for_round(
            model, cfg.freeze_layers, cfg.freeze_rounds, cfg.unfreeze_lr_factor, server_round
        )
        optimizer = _optimizer(cfg, model, freezing)
        loader = self._train_loader(server_round)
        steps_per_epoch = len(loader)
        private, train_model = None, model
        if cfg.private:
            private = _DPSGD(model, optimizer, cfg, len(self.train_set))
            train_model, optimizer = private.module, private.optimizer
            steps_per_epoch = private.steps_per_epoch
        total_steps = steps_per_epoch * cfg.local_epochs
        # DP-SGD clips each sample's gradient as it is: no loss scaling, fp32 (below).
        scaler = torch.amp.GradScaler(
            enabled=self.autocast_dtype == torch.float16 and private is None
        )

        best_loss, best_state, epochs_without_gain = math.inf, None, 0
        skipped_steps = 0
        loss_sum, loss_count, epochs_run, step = 0.0, 0, 0, 0
        validation_loss = math.nan
        for _epoch in range(cfg.local_epochs):
            train_model.train()
            freezing.hold_statistics(model)
            if private is not None:
                loader = private.epoch_loader(self.train_set, self.task.collate, server_round)
            for batch in loader:
                lr = learning_rate_at(
                    cfg.learning_rate,
                    cfg.lr_schedule,
                    server_round,
                    num_rounds,
                    step / max(total_steps, 1),
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get(LR_SCALE, 1.0)
                batch = _to_device(batch, self.device)
                with self._autocast() if private is None else nullcontext():
                    loss = self.task.train_step(train_model, batch, loss_function)
                if global_params is not None:
                    loss = loss + _proximal_term(model, global_params, proximal_mu)
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if not torch.isfinite(loss.detach()):
                    # Reduced precision overflowed: skip the step, as a GradScaler would.
                    skipped_steps += 1
                    continue
                scaler.scale(loss).backward()
                if self.autocast_dtype == torch.bfloat16 and not _finite_gradients(model):
                    skipped_steps += 1
                    continue
                scaler.step(optimizer)
                scaler.update()
                n = len(batch["label"])
                loss_sum += float(loss.detach()) * n
                loss_count += n
            epochs_run += 1
            if private is not None and ledger is not None:
                ledger.add(cfg.dp_noise_multiplier, private.sample_rate, steps_per_epoch)
            validation_loss = self.evaluate(model).compute().get("loss", math.nan)
            if not math.isfinite(validation_loss) or validation_loss < best_loss - 1e-6:
                best_loss, epochs_without_gain = validation_loss, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                epochs_without_gain += 1
                if epochs_without_gain >= cfg.early_stopping_patience:
                    break
        if private is not None:
            private.close()
        freezing.release(model)
        if step and skipped_steps == step:
            raise FloatingPointError(
                f"all {step} training steps gave non-finite losses or gradients at precision "
                f'{cfg.precision}; try precision = "fp32" or a lower learning-rate'
            )
        stopped_early = epochs_run < cfg.local_epochs
        if best_state is not None and math.isfinite(best_loss):
            model.load_state_dict(best_state)
            validation_loss = best_loss
        return FitResult(
            num_examples=len(self.train_set),
            train_loss=loss_sum / max(loss_count, 1),
            epochs_run=epochs_run,
            validation_loss=validation_loss,
            stopped_early=stopped_early,
            skipped_steps=skipped_steps,
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: LabelledDataset | None = None) -> MetricStates:
        """Metric states of ``model`` on ``dataset`` (the validation split by default)."""
        dataset = dataset if dataset is not None else self.validation_set
        model.to(self.device).eval()
        states = self.task.new_states()
        loader = DataLoader(
            _as_dataset(dataset),
            batch_size=self.config.batch_size * 2,
            collate_fn=self.task.collate,
        )
        for batch in loader:
            batch = _to_device(batch, self.device)
            with self._autocast():
                self.task.eval_step(model, batch, states)
        return states

    @torch.no_grad()
    def evaluate_cells(
        self, model: nn.Module, dataset: LabelledDataset, spec: SubgroupSpec
    ) -> CellStates:
        """States of ``model`` on ``dataset``, overall and per subgroup cell of ``spec``.

        One forward pass; each batch's predictions are added to the overall states and to
        the states of every cell its samples belong to. Cells with fewer than
        ``spec.min_cell_size`` distinct patients, and the cells withheld with them so that
        none can be computed by subtraction (``common.subgroups.withheld_cells``), are dropped
        here, before anything is sent. A dataset without an attribute table has no cells.
        """
        table = dataset.attributes
        masks = spec.cells(table) if table is not None and spec.site_attributes else {}
        counts = {
            cell: int(table.loc[mask, mf.PATIENT_ID].nunique())  # type: ignore[union-attr]
            for cell, mask in masks.items()
        }
        withheld = withheld_cells(masks, counts, spec.min_cell_size)
        patients: dict[str, int] = {}
        kept: dict[str, np.ndarray] = {}
        suppressed: list[str] = []
        for (attribute, value), mask in masks.items():
            name = cell_name(attribute, value)
            if (attribute, value) in withheld:
                suppressed.append(name)
            else:
                kept[name], patients[name] = mask, counts[(attribute, value)]
        model.to(self.device).eval()
        overall = self.task.new_states()
        states = {name: self.task.new_states() for name in kept}
        loader = DataLoader(
            _as_dataset(dataset),
            batch_size=self.config.batch_size * 2,
            collate_fn=self.task.collate,
        )
        start = 0
        for batch in loader:
            batch = _to_device(batch, self.device)
            with self._autocast():
                prediction, target = self.task.final_predict(model, batch)
            overall.update(prediction, target)
            stop = start + len(target)
            for name, mask in kept.items():
                rows = mask[start:stop]
                if rows.any():
                    states[name].update(_rows(prediction, rows), _rows(target, rows))
            start = stop
        return CellStates(overall, states, patients, suppressed)

    def _train_loader(self, server_round: int) -> DataLoader[dict[str, Any]]:
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + server_round)
        # A batch of one breaks BatchNorm; drop a last batch of one sample.
        drop_last = len(self.train_set) % self.config.batch_size == 1
        if self.config.class_balancing == "sampler":
            sampler = WeightedRandomSampler(
                self.task.sample_weights(self.train_labels).double().tolist(),
                num_samples=len(self.train_set),
                replacement=True,
                generator=generator,
            )
            return DataLoader(
                _as_dataset(self.train_set),
                batch_size=self.config.batch_size,
                sampler=sampler,
                drop_last=drop_last,
                collate_fn=self.task.collate,
            )
        return DataLoader(
            _as_dataset(self.train_set),
            batch_size=self.config.batch_size,
            shuffle=True,
            generator=generator,
            drop_last=drop_last,
            collate_fn=self.task.collate,
        )

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


class _DPSGD:
    """Opacus' per-sample gradients and noisy optimizer around one round's model and optimizer.

    Batches are Poisson-sampled, as the accountant assumes: each sample joins each step with
    probability ``batch_size / len(train)``, ``len(train) / batch_size`` steps per epoch. An
    empty draw is skipped but still counted as a step (probability ``(1 - q)^n``, about
    ``e^-batch_size``).
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, config: ClientConfig, n: int
    ) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self.module = GradSampleModule(model)
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=config.dp_noise_multiplier,
            max_grad_norm=config.dp_max_grad_norm,
            expected_batch_size=config.batch_size,
        )
        self.n = n
        self.sample_rate = min(1.0, config.batch_size / n)
        self.steps_per_epoch = max(1, math.ceil(n / config.batch_size))
        self.seed = config.seed
        self.epoch = 0

    def epoch_loader(
        self, dataset: LabelledDataset, collate: Any, server_round: int
    ) -> DataLoader[dict[str, Any]]:
        generator = torch.Generator().manual_seed(
            self.seed * 100_003 + server_round * 1_009 + self.epoch
        )
        self.epoch += 1
        draws = torch.rand(self.steps_per_epoch, self.n, generator=generator) < self.sample_rate
        batches = [torch.nonzero(row).flatten().tolist() for row in draws]
        return DataLoader(
            _as_dataset(dataset), batch_sampler=[b for b in batches if b], collate_fn=collate
        )

    def close(self) -> None:
        """Remove Opacus' hooks from the trained module."""
        self.module._close()


def _as_dataset(dataset: LabelledDataset) -> Dataset[dict[str, Any]]:
    """The protocol's structural type, as torch's DataLoader annotation wants it."""
    return cast(Dataset[dict[str, Any]], dataset)


def _optimizer(config: ClientConfig, model: nn.Module, freezing: Freezing) -> torch.optim.Optimizer:
    """A fresh optimizer each round: optimizer state is local and never sent."""
    groups = freezing.parameter_groups(model)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=config.learning_rate,
            momentum=0.9,
            nesterov=True,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.float16
    # auto: fp16 mixed precision on CUDA. On a CPU with native bf16 (AVX512-BF16/AMX) bf16
    # autocast trained ResNet-18 1.39x faster here at equal AUC (simulations/bench/precision.py);
    # where bf16 would be emulated it is slower, so fp32 stays.
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if _cpu_has_native_bf16() else None


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _finite_gradients(model: nn.Module) -> bool:
    """Whether every gradient is finite, from the sum of each: a NaN or infinity anywhere
    makes its sum non-finite (a sum overflowing float32 too: such a step is skipped as well).

    About 1.6 ms per ResNet-18 step on this CPU, where checking each parameter's values cost
    17 ms (a sync per tensor) and the max-abs norm 16 ms."""
    sums = [p.grad.sum() for p in model.parameters() if p.grad is not None]
    return not sums or bool(torch.isfinite(torch.stack(sums).sum()))


def _proximal_term(model: nn.Module, global_params: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx (Li et al., 2020): mu/2 * ||w - w_global||^2."""
    squared = sum(
        ((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params, strict=True)
    )
    return 0.5 * mu * squared  # type: ignore[return-value]


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: _moved(v, device) for k, v in batch.items()}


def _moved(value: Any, device: torch.device) -> Any:
    """Tensors on ``device``, also inside lists and dicts (detection targets)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, list):
        return [_moved(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    return value


def _rows(values: Any, rows: np.ndarray) -> Any:
    """The samples of a batch selected by a boolean mask: a tensor's rows or a list's items."""
    if isinstance(values, torch.Tensor):
        return values[torch.as_tensor(rows, device=values.device)]
    if isinstance(values, Mapping):
        return {key: _rows(value, rows) for key, value in values.items()}
    return [v for v, keep in zip(values, rows, strict=True) if keep]
