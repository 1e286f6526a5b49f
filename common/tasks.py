"""Tasks by name: each knows its model family, loss, train and eval steps and metric states.

Server, client and simulation code ask the task and never branch on its name, so a new task
(segmentation, detection: issue #5) is a new class registered here, nothing else.

A batch is a MONAI-style dictionary: ``{"image": (N, C, *spatial), "label": ...}``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol

import torch
from monai import transforms as mt
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import nn

from common.config import ModelConfig
from common.errors import ConfigError, RegistryError
from common.metrics import CLASSIFICATION_METRICS, ClassificationStates, MetricInfo
from common.models import build_model, list_models, model_task
from common.seg_metrics import SEGMENTATION_METRICS, SegmentationStates
from common.synthetic import SiteData

Batch = dict[str, torch.Tensor]


class MetricStates(Protocol):
    """Summable metric states (see ``common.metrics``)."""

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None: ...

    def to_record(self) -> dict[str, list[float]]: ...

    def add_record(self, record: Mapping[str, object]) -> None: ...

    def compute(self) -> dict[str, float]: ...


class Task(ABC):
    """One kind of radiology learning problem."""

    name: ClassVar[str]
    #: The validation metric that picks the best global model.
    primary_metric: ClassVar[str]
    metrics: ClassVar[dict[str, MetricInfo]]
    #: The model ``radfl simulate --task NAME`` trains when no ``--model`` is given.
    default_model: ClassVar[str]

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        if model_task(config.model) != self.name:
            raise ConfigError(
                f"model {config.model!r} is a {model_task(config.model)} network; task "
                f"{self.name} takes {', '.join(list_models(self.name))}"
            )

    def build_model(self) -> nn.Module:
        """A fresh network for this task, seeded by the run's seed."""
        torch.manual_seed(self.config.seed)
        return build_model(
            self.config.model,
            spatial_dims=self.config.spatial_dims,
            in_channels=1,
            out_channels=self.output_channels(),
        )

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

    @abstractmethod
    def new_states(self) -> MetricStates:
        """Empty metric states."""

    @abstractmethod
    def predict(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward a batch in eval mode: ``(prediction, target)``, both indexed by sample first,
        as the task's metric states take them in ``update``."""

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

    def synthetic_targets(self, data: SiteData) -> torch.Tensor | None:
        """What a synthetic site's samples are labelled with; ``None``: the image's class."""
        return None


class ClassificationTask(Task):
    """Binary or multi-class image classification (class 0: no finding)."""

    name = "classification"
    primary_metric = "auc"
    metrics = CLASSIFICATION_METRICS
    default_model = "resnet18"

    def output_channels(self) -> int:
        return self.config.num_classes

    def loss_function(self, train_labels: torch.Tensor | None, balance: bool) -> nn.Module:
        if not balance or train_labels is None:
            return nn.CrossEntropyLoss()
        return nn.CrossEntropyLoss(weight=self._class_weights(train_labels))

    def sample_weights(self, labels: torch.Tensor) -> torch.Tensor:
        return self._class_weights(labels)[labels]

    def _class_weights(self, labels: torch.Tensor) -> torch.Tensor:
        return inverse_frequency_weights(labels, self.config.num_classes)

    def new_states(self) -> ClassificationStates:
        return ClassificationStates(self.config.num_classes)

    def predict(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch["image"]).float()
        return torch.softmax(logits, dim=1), batch["label"]

    def augmentation(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        size = (self.config.image_size,) * self.config.spatial_dims
        crop = tuple(max(8, int(round(s * 0.875))) for s in size)
        return mt.Compose(
            [
                mt.RandFlipd(keys="image", prob=0.5, spatial_axis=0),
                mt.RandRotated(keys="image", range_x=0.26, prob=0.5, padding_mode="border"),
                mt.RandZoomd(
                    keys="image", min_zoom=0.9, max_zoom=1.1, prob=0.5, padding_mode="edge"
                ),
                mt.RandSpatialCropd(keys="image", roi_size=crop, random_size=False),
                mt.Resized(keys="image", spatial_size=size),
                mt.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
                mt.RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.5),
            ]
        )


class SegmentationTask(Task):
    """Semantic segmentation: a label map per image, class 0 background (``num-classes``
    counts it). Dice plus cross-entropy loss; volumes larger than the training size are
    predicted with MONAI's sliding-window inference over ``image-size`` patches."""

    name = "segmentation"
    primary_metric = "dice"
    metrics = SEGMENTATION_METRICS
    default_model = "unet"

    #: Four 2x downsamplings with at least 2 voxels left at the bottom.
    MIN_IMAGE_SIZE = 32
    SIZE_MULTIPLE = 16

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        size = config.image_size
        if size < self.MIN_IMAGE_SIZE or size % self.SIZE_MULTIPLE:
            raise ConfigError(
                f"run-config key image-size must be a multiple of {self.SIZE_MULTIPLE} and at "
                f"least {self.MIN_IMAGE_SIZE} for segmentation networks, got {size}"
            )

    def output_channels(self) -> int:
        return self.config.num_classes

    def loss_function(self, train_labels: torch.Tensor | None, balance: bool) -> nn.Module:
        # Dice is insensitive to class imbalance by construction; ``balance`` changes nothing.
        return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)

    def sample_weights(self, labels: torch.Tensor) -> torch.Tensor:
        # Images with and without a lesion weigh the same in total.
        return inverse_frequency_weights((labels > 0).long(), 2)[(labels > 0).long()]

    def new_states(self) -> SegmentationStates:
        return SegmentationStates(self.config.num_classes)

    def predict(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        image = batch["image"]
        patch = (self.config.image_size,) * self.config.spatial_dims
        if any(size > edge for size, edge in zip(image.shape[2:], patch, strict=True)):
            logits = sliding_window_inference(
                image, roi_size=patch, sw_batch_size=4, predictor=model, overlap=0.25
            )
        else:
            logits = model(image)
        return torch.softmax(torch.as_tensor(logits).float(), dim=1), batch["label"]

    def synthetic_targets(self, data: SiteData) -> torch.Tensor | None:
        if data.masks is None:
            raise ValueError(f"synthetic site {data.profile.name} has no lesion masks")
        return data.masks.long()

    def augmentation(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        keys = ["image", "label"]
        return mt.Compose(
            [
                mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
                mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
                mt.RandRotate90d(keys=keys, prob=0.5, spatial_axes=(0, 1)),
                mt.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
                mt.RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.5),
            ]
        )


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


register_task(ClassificationTask)
register_task(SegmentationTask)
