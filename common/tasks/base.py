"""The Task base class and the registry of tasks by name.

A task knows its model family, loss, train and eval steps, its metric states and what the
data and the report need from it (manifest columns, targets, default batch size, primary and
headline metrics, operating threshold). Server, client and simulation code ask the task and
never branch on its name. Adding a task is one module in ``common/tasks/`` that subclasses
:class:`Task` and calls :func:`register_task`, its metric states (a
:class:`common.states.SummableStates`), its models (``common.models``) and its tests.

A batch is a MONAI-style dictionary: ``{"image": (N, C, *spatial), "label": ...}``.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from monai import transforms as mt
from torch import nn

from common import manifest as mf
from common.errors import ConfigError, RegistryError
from common.models import build_model, list_models, model_task
from common.states import MetricInfo, SummableStates

if TYPE_CHECKING:  # the synthetic generator is simulation data; only its type is named here
    from common.synthetic import SiteData

Batch = dict[str, torch.Tensor]
#: A network's normalisation layers: BatchNorm as registered, or GroupNorm in its place (the
#: network DP-SGD and update-level DP train, ``common.privacy.private_model``).
Normalisation = Literal["batch", "group"]
NORMALISATIONS: tuple[Normalisation, ...] = ("batch", "group")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What both sides need to build the same network (``common.config`` reads it from a run
    config)."""

    task: str
    model: str
    spatial_dims: int
    image_size: int
    num_classes: int
    seed: int
    normalisation: Normalisation = "batch"

    @classmethod
    def of_run(cls, config: Any) -> ModelConfig:
        """The network an app's run config (``common.config``) builds: GroupNorm in BatchNorm's
        place where DP needs it (its ``private_network``)."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "normalisation"]
        normalisation: Normalisation = "group" if config.private_network else "batch"
        return cls(**{name: getattr(config, name) for name in names}, normalisation=normalisation)

    @classmethod
    def of_model(cls, metadata: Mapping[str, Any]) -> ModelConfig:
        """The network a logged model's RadFL metadata (``server.tracking.model_metadata``)
        describes; a model logged before ``normalisation`` was recorded has BatchNorm."""
        normalisation = str(metadata.get("normalisation") or "batch")
        if normalisation not in NORMALISATIONS:
            raise ConfigError(
                f"model metadata: normalisation {normalisation!r} is not one of "
                f"{', '.join(NORMALISATIONS)}"
            )
        return cls(
            task=str(metadata["task"]),
            model=str(metadata["model"]),
            spatial_dims=int(metadata["spatial_dims"]),
            image_size=int(metadata["image_size"]),
            num_classes=int(metadata["num_classes"]),
            seed=0,
            normalisation=normalisation,  # type: ignore[arg-type]
        )


#: What a task's ``new_states`` returns: summable states (``common.states``).
MetricStates = SummableStates


class Task(ABC):
    """One kind of radiology learning problem."""

    name: ClassVar[str]
    #: The one metric that picks the best global model per round and that the report's
    #: subgroup gaps and fairness table centre on.
    primary_metric: ClassVar[str]
    #: The metrics the report shows first.
    headline_metrics: ClassVar[tuple[str, ...]]
    metrics: ClassVar[dict[str, MetricInfo]]
    #: Manifest columns a site's data needs for this task, beside the common ones.
    required_columns: ClassVar[tuple[str, ...]]
    #: What ``batch-size = 0`` stands for: dense tasks learn per pixel and need the optimiser
    #: steps (2D U-Net, 3 sites of 300 images, 20 rounds of 3 epochs: FedAvg test per-case
    #: Dice 0.509 at batch 32, 0.580 at batch 8, against 0.636 and 0.612 pooled).
    default_batch_size: ClassVar[int] = 8
    #: How the report's operating threshold is chosen when the task has none.
    threshold_note: ClassVar[str] = "no threshold"
    #: Whether the manifest's ``label`` column is the target (every row needs a class in
    #: range, and the site check counts the classes); otherwise a blank label reads as 0.
    label_is_target: ClassVar[bool] = False
    #: The manifest column holding the target when ``label_is_target`` (read by
    #: :meth:`parse_label`; a blank cell is an unlabelled study).
    label_column: ClassVar[str] = mf.LABEL
    #: Manifest column naming a mask file the targets are read from (``None``: none).
    mask_column: ClassVar[str | None] = None
    #: Whether that mask numbers instances (1..k) rather than holding classes.
    numbered_instances: ClassVar[bool] = False
    #: Manifest column holding the boxes as JSON (``None``: none).
    box_column: ClassVar[str | None] = None
    #: Whether the final evaluation wants each sample's lesion mask (as ``lesion``) where the
    #: data has one (a synthetic site's masks, a manifest's ``mask`` column), beside its target.
    lesion_masks: ClassVar[bool] = False
    #: The model ``radfl simulate --task NAME`` trains when no ``--model`` is given.
    default_model: ClassVar[str]
    #: Metrics the simulation summary shows per round beside the primary metric and loss.
    round_metrics: ClassVar[tuple[str, ...]] = ()
    #: The task whose registered networks (``common.models``) this one trains; ``None``: the
    #: networks registered under its own name.
    model_family: ClassVar[str | None] = None

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        family = self.model_family or self.name
        if model_task(config.model) != family:
            raise ConfigError(
                f"model {config.model!r} is a {model_task(config.model)} network; task "
                f"{self.name} takes {', '.join(list_models(family))}"
            )

    def build_model(self) -> nn.Module:
        """A fresh network for this task, seeded by the run's seed, with the configuration's
        normalisation layers."""
        torch.manual_seed(self.config.seed)
        network = build_model(
            self.config.model,
            spatial_dims=self.config.spatial_dims,
            in_channels=1,
            out_channels=self.output_channels(),
        )
        if self.config.normalisation == "group":
            from opacus.validators import ModuleValidator

            network = ModuleValidator.fix(network)
        return network

    @abstractmethod
    def output_channels(self) -> int:
        """Number of output channels of the network."""

    @abstractmethod
    def loss_function(self, train_labels: torch.Tensor | None, balance: bool) -> nn.Module:
        """The training loss; ``balance`` weights classes by their inverse frequency."""

    @abstractmethod
    def sample_weights(self, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample weights that balance the classes, for a weighted sampler."""

    def train_step(self, model: nn.Module, batch: Batch, loss_function: nn.Module) -> torch.Tensor:
        """Forward a batch and return the loss to minimise (no backward here)."""
        logits = model(batch["image"])
        return loss_function(logits.float(), batch["label"])  # type: ignore[no-any-return]

    @classmethod
    @abstractmethod
    def empty_states(cls, num_classes: int) -> MetricStates:
        """Empty metric states for a run with ``num-classes`` (the report builds them from
        stored records, without a model configuration)."""

    def new_states(self) -> MetricStates:
        """Empty metric states of this run."""
        return self.empty_states(self.config.num_classes)

    @classmethod
    def operating_threshold(
        cls, validation: MetricStates, method: str, target_sensitivity: float
    ) -> tuple[float, str]:
        """The report's operating threshold, chosen on the pooled validation states, with a
        note on how; NaN where the task has none."""
        return math.nan, cls.threshold_note

    @abstractmethod
    def predict(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward a batch in eval mode: ``(prediction, target)``, both indexed by sample first,
        as the task's metric states take them in ``update``."""

    def final_predict(self, model: nn.Module, batch: Batch) -> tuple[Any, torch.Tensor]:
        """The final evaluation's forward pass: ``predict`` unless the task's states take
        more there (classification: logits, uncertainty and Grad-CAM attention). The rows of
        every tensor it returns (also inside a dict) are its samples."""
        return self.predict(model, batch)

    def eval_step(self, model: nn.Module, batch: Batch, states: MetricStates) -> None:
        """Forward a batch in eval mode and add it to ``states``."""
        states.update(*self.predict(model, batch))

    def pool(self, records: Iterable[Mapping[str, object]]) -> MetricStates:
        """Sum the metric states sent by several sites."""
        states = self.new_states()
        for record in records:
            states.add_record(record)
        return states

    def augmentation(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """Random MONAI transforms applied to each training sample dictionary."""
        return mt.Compose([])

    @classmethod
    def site_target(
        cls, item: Mapping[str, Any], label: torch.Tensor, boxes: np.ndarray | None
    ) -> Any:
        """A real site's target for one preprocessed manifest row: ``item`` holds the
        preprocessed ``mask`` (with ``mask_column``) or ``boxes`` and ``box_labels`` (with
        ``box_column``), ``label`` the row's image-level class and ``boxes`` the row's boxes as
        the manifest gave them. Raises ``ValueError`` when preprocessing lost part of the
        target (the loader names the row and file)."""
        return label

    @classmethod
    def parse_label(cls, text: str, num_classes: int | None) -> Any:
        """A row's target from its ``label_column`` cell: here an integer class in
        ``[0, num_classes)`` (any class when ``num_classes`` is ``None``). Raises
        ``ValueError`` saying what is wrong with the value (the site check and the loader add
        the file, line and column)."""
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"label {text!r} is not an integer") from None
        if not math.isfinite(number) or number != int(number):
            raise ValueError(f"label {text!r} is not an integer")
        if number < 0 or (num_classes is not None and number >= num_classes):
            raise ValueError(f"label {int(number)} outside [0, {num_classes})")
        return int(number)

    def pseudo_label(
        self, prediction: torch.Tensor, threshold: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets for unlabelled samples from this task's ``predict`` output, and which of
        them the model is confident about (probability at least ``threshold``): pseudo-labels
        (``pseudo-label-threshold``). A task without them refuses by name."""
        raise ConfigError(
            f"task {self.name} has no pseudo-labels; pseudo-label-threshold must be 0"
        )

    @classmethod
    def synthetic_options(cls) -> dict[str, Any]:
        """Keyword arguments of ``common.synthetic.make_site`` a synthetic site of this
        task needs (the multi-label task's second finding)."""
        return {}

    def synthetic_targets(self, data: SiteData) -> Any:
        """What a synthetic site's samples are labelled with (a tensor or a list, one item per
        image); ``None``: the image's class."""
        return None

    #: How samples form a batch; ``None``: PyTorch's default collation.
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None

    def overlay(self, model: nn.Module, sample: dict[str, Any]) -> Overlay | None:
        """Truth against prediction on one sample, for pictures of synthetic validation
        images in simulation; ``None``: nothing to draw (image-level labels)."""
        return None


@dataclass(frozen=True)
class Overlay:
    """What a picture of one prediction shows: label maps (0 background) and boxes."""

    truth: np.ndarray
    predicted: np.ndarray
    truth_boxes: np.ndarray
    predicted_boxes: np.ndarray
    #: Predicted boxes scoring below this are left out of the picture.
    SCORE = 0.3

    @staticmethod
    def boxes(value: Any) -> np.ndarray:
        return np.asarray(torch.as_tensor(value).detach().cpu(), dtype=np.float64)


def inverse_frequency_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class weights ``n / (num_classes * count)``; a class absent here gets 0, not infinity."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    return torch.where(counts > 0, labels.numel() / (len(counts) * counts.clamp(min=1)), 0.0)


_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Register a task class under its ``name``; a duplicate name raises."""
    if cls.name in _TASKS:
        raise RegistryError(f"task {cls.name!r} is already registered")
    _TASKS[cls.name] = cls
    return cls


def unregister_task(name: str) -> None:
    """Remove a registered task (tests that register a toy task clean up with this)."""
    task_class(name)
    del _TASKS[name]


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def task_class(name: str) -> type[Task]:
    """The task class registered as ``name``."""
    try:
        return _TASKS[name]
    except KeyError:
        raise RegistryError(
            f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}"
        ) from None


def get_task(config: ModelConfig) -> Task:
    """The task named by ``config.task``, bound to that model configuration."""
    return task_class(config.task)(config)
