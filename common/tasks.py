"""Tasks by name: each knows its model family, loss, train and eval steps and metric states.

Server, client and simulation code ask the task and never branch on its name, so a new task
(segmentation, detection, instance segmentation: issue #5) is a new class registered here,
nothing else.

A batch is a MONAI-style dictionary: ``{"image": (N, C, *spatial), "label": ...}``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from monai import transforms as mt
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.transforms import dictionary as mdt
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import nn

from common.config import ModelConfig
from common.det_metrics import DETECTION_METRICS, DetectionStates
from common.errors import ConfigError, RegistryError
from common.instance_metrics import INSTANCE_METRICS, InstanceStates
from common.metrics import CLASSIFICATION_METRICS, ClassificationStates, MetricInfo
from common.models import SEGMENTATION_KEY, ResNetFPN, build_model, list_models, model_task
from common.seg_metrics import SEGMENTATION_METRICS, SegmentationStates
from common.synthetic import LESION_SCALE, SiteData

Batch = dict[str, torch.Tensor]


class MetricStates(Protocol):
    """Summable metric states (see ``common.metrics``)."""

    def update(self, prediction: Any, target: Any) -> None: ...

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
    #: Metrics the simulation summary shows per round beside the primary metric and loss.
    round_metrics: ClassVar[tuple[str, ...]] = ()

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


class ClassificationTask(Task):
    """Binary or multi-class image classification (class 0: no finding)."""

    name = "classification"
    primary_metric = "auc"
    metrics = CLASSIFICATION_METRICS
    default_model = "resnet18"
    round_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "sensitivity", "specificity")

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
    round_metrics: ClassVar[tuple[str, ...]] = ("dice_case_mean", "hd95_mean")

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

    def overlay(self, model: nn.Module, sample: dict[str, Any]) -> Overlay | None:
        batch = {"image": sample["image"][None], "label": torch.as_tensor(sample["label"])[None]}
        with torch.no_grad():
            probabilities, target = self.predict(model, batch)
        none = np.zeros((0, 2 * self.config.spatial_dims))
        return Overlay(target[0, 0].numpy(), probabilities.argmax(1)[0].numpy(), none, none)

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


class ATSSRetinaNetDetector(RetinaNetDetector):
    """MONAI's RetinaNet detector matching anchors with MONAI's ATSS matcher only.

    MONAI's own anchor matching first checks ``isinstance(matcher, torchvision's Matcher)``,
    which fails where torchvision is not installed; ATSS (Zhang et al., 2020) needs nothing
    from torchvision.
    """

    def compute_anchor_matched_idxs(
        self,
        anchors: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        num_anchor_locs_per_level: Sequence[int],
    ) -> list[torch.Tensor]:
        matched = []
        for anchors_i, targets_i in zip(anchors, targets, strict=True):
            boxes = targets_i[self.target_box_key]
            if boxes.numel() == 0:
                unmatched = torch.full((anchors_i.size(0),), -1, dtype=torch.int64)
                matched.append(unmatched.to(anchors_i.device))
                continue
            _, index = self.proposal_matcher(
                boxes.to(anchors_i.device),
                anchors_i,
                num_anchor_locs_per_level,
                self.num_anchors_per_loc,
            )
            matched.append(index)
        return matched


class DetectionTask(Task):
    """Lesion detection with boxes: RetinaNet with a feature pyramid and focal loss.

    A sample's ``"label"`` is ``{"boxes": (k, 2 * dims) corners, "labels": (k,) classes}``
    with object classes from 0 (a manifest's lesion kind minus one); ``num-classes`` counts
    "no finding" as in classification, so there are ``num-classes - 1`` object classes.
    """

    name = "detection"
    primary_metric = "ap50"
    metrics = DETECTION_METRICS
    default_model = "retinanet"
    round_metrics: ClassVar[tuple[str, ...]] = ("map", "froc")
    #: Anchor edge lengths at 64 px in 2D, scaled with ``image-size`` and, in 3D, with the
    #: synthetic lesions' larger size relative to the field of view: the lesions' range.
    ANCHOR_SIZES_AT_64 = (4.0, 8.0, 14.0)

    def output_channels(self) -> int:
        return max(self.config.num_classes - 1, 1)

    def loss_function(self, train_labels: torch.Tensor | None, balance: bool) -> nn.Module:
        # The detector computes focal and box-regression losses itself.
        return nn.Identity()

    def sample_weights(self, labels: torch.Tensor) -> torch.Tensor:
        return inverse_frequency_weights((labels > 0).long(), 2)[(labels > 0).long()]

    def detector(self, model: nn.Module) -> ATSSRetinaNetDetector:
        """A detector around ``model`` (a RetinaNet's detection maps): anchors, matcher,
        sampler, box decoding."""
        dims = self.config.spatial_dims
        scale = self.config.image_size / 64.0 * LESION_SCALE[dims]
        shapes = [(size * scale,) * dims for size in self.ANCHOR_SIZES_AT_64]
        anchors = AnchorGeneratorWithAnchorShape(
            feature_map_scales=ResNetFPN.FEATURE_STRIDES, base_anchor_shapes=shapes
        )
        detector = ATSSRetinaNetDetector(
            model, anchors, spatial_dims=dims, num_classes=self.output_channels(), size_divisible=8
        )
        detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
        detector.set_hard_negative_sampler(
            batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16
        )
        detector.set_target_keys(box_key="boxes", label_key="labels")
        detector.set_box_selector_parameters(
            score_thresh=0.02, topk_candidates_per_level=100, nms_thresh=0.2, detections_per_img=20
        )
        return detector

    def train_step(self, model: nn.Module, batch: Batch, loss_function: nn.Module) -> torch.Tensor:
        detector = self.detector(model)
        detector.train()
        losses = detector(list(batch["image"]), list(batch["label"]))
        return losses[detector.cls_key].float() + losses[detector.box_reg_key].float()

    def new_states(self) -> DetectionStates:
        return DetectionStates(self.output_channels())

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Batch) -> tuple[Any, Any]:
        detector = self.detector(model)
        detector.eval()
        outputs = detector(list(batch["image"]), use_inferer=False)
        predictions = [
            {
                "boxes": o["boxes"].float(),
                "labels": o["labels"],
                "scores": o[detector.pred_score_key].float(),
            }
            for o in outputs
        ]
        return predictions, list(batch["label"])

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "label": [s["label"] for s in samples],
        }

    def synthetic_targets(self, data: SiteData) -> list[dict[str, torch.Tensor]]:
        return [boxes_target(boxes, self.config.spatial_dims) for boxes in data.boxes]

    def overlay(self, model: nn.Module, sample: dict[str, Any]) -> Overlay | None:
        predictions, targets = self.predict(model, self.collate([sample]))
        prediction, target = predictions[0], targets[0]
        keep = prediction["scores"] >= Overlay.SCORE
        shape = tuple(sample["image"].shape[1:])
        return Overlay(
            _union(target.get("masks"), target["labels"], shape),
            _union(prediction.get("masks", None), prediction["labels"], shape, keep),
            Overlay.boxes(target["boxes"]),
            Overlay.boxes(prediction["boxes"][keep]),
        )

    #: Keys of a sample's target that are images (flipped and rotated with the image).
    TARGET_IMAGES: ClassVar[tuple[str, ...]] = ()

    def augmentation(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """Flips on every axis and 90-degree rotations in the first plane, boxes moved with
        the image (MONAI's box transforms), and intensity changes."""
        images = ["image", *self.TARGET_IMAGES]
        flips = [
            mdt.RandFlipBoxd(images, "boxes", "image", prob=0.5, spatial_axis=axis)
            for axis in range(self.config.spatial_dims)
        ]
        return mt.Compose(
            [
                mt.Lambda(_unnest_target),
                *flips,
                mdt.RandRotateBox90d(images, "boxes", "image", prob=0.5, spatial_axes=(0, 1)),
                mt.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
                mt.RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.5),
                mt.Lambda(partial(_nest_target, keys=("boxes", "labels", *self.TARGET_IMAGES))),
            ]
        )


class SegmentationTap(nn.Module):
    """Hands a Retina U-Net's detection maps to MONAI's detector, which knows only those, and
    keeps its segmentation logits in ``segmentation``."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.segmentation: torch.Tensor | None = None

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        outputs = dict(self.network(images))
        self.segmentation = outputs.pop(SEGMENTATION_KEY)
        return outputs


class InstanceTask(DetectionTask):
    """Instance segmentation: detect each lesion, then mask it (Retina U-Net).

    A sample's ``"label"`` is the detection target plus ``"masks"``: ``(k, *spatial)``, one
    binary mask per box. The loss is RetinaNet's (focal and box regression) plus Dice and
    cross-entropy on the semantic segmentation (the union of the masks, by class). Each
    detected box becomes an instance whose mask is the segmentation of its class inside the
    box. Metrics: mask AP, box AP and per-instance Dice (``common.instance_metrics``).
    """

    name = "instance"
    primary_metric = "ap50"
    metrics = INSTANCE_METRICS
    default_model = "retina-unet"
    round_metrics: ClassVar[tuple[str, ...]] = ("map", "instance_dice", "box_ap50")
    TARGET_IMAGES = ("masks",)

    def train_step(self, model: nn.Module, batch: Batch, loss_function: nn.Module) -> torch.Tensor:
        tap = SegmentationTap(model)
        detector = self.detector(tap)
        detector.train()
        losses = detector(list(batch["image"]), list(batch["label"]))
        assert tap.segmentation is not None
        semantic = torch.stack([semantic_map(t, batch["image"].shape[2:]) for t in batch["label"]])
        segmentation = self._segmentation_loss(tap.segmentation.float(), semantic)
        return (
            losses[detector.cls_key].float() + losses[detector.box_reg_key].float() + segmentation
        )

    _segmentation_loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)

    def new_states(self) -> InstanceStates:
        return InstanceStates(self.output_channels())

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Batch) -> tuple[Any, Any]:
        tap = SegmentationTap(model)
        detector = self.detector(tap)
        detector.eval()
        outputs = detector(list(batch["image"]), use_inferer=False)
        assert tap.segmentation is not None
        semantic = tap.segmentation.argmax(dim=1)
        predictions = []
        for output, classes in zip(outputs, semantic, strict=True):
            boxes = output["boxes"].float()
            labels = output["labels"]
            predictions.append(
                {
                    "boxes": boxes,
                    "labels": labels,
                    "scores": output[detector.pred_score_key].float(),
                    "masks": masks_in_boxes(classes, boxes, labels),
                }
            )
        return predictions, list(batch["label"])

    def synthetic_targets(self, data: SiteData) -> list[dict[str, torch.Tensor]]:
        if data.instances is None:
            raise ValueError(f"synthetic site {data.profile.name} has no instance maps")
        return [
            instance_target(instances, kind)
            for instances, kind in zip(data.instances, data.labels, strict=True)
        ]


def boxes_target(boxes: Sequence[Sequence[float]], spatial_dims: int) -> dict[str, torch.Tensor]:
    """A detection target from ``[corners..., kind]`` boxes (kind 1 is object class 0)."""
    corners = torch.tensor([b[: 2 * spatial_dims] for b in boxes], dtype=torch.float32)
    kinds = torch.tensor([int(b[-1]) - 1 for b in boxes], dtype=torch.int64)
    return {"boxes": corners.reshape(-1, 2 * spatial_dims), "labels": kinds.clamp(min=0)}


def instance_target(instances: torch.Tensor, kind: int | torch.Tensor) -> dict[str, torch.Tensor]:
    """An instance target from an instance map ``(1, *spatial)`` (0 background, ``k`` on
    instance ``k``): one mask and box per instance, every instance of the image's ``kind``
    (object class ``kind - 1``, at least 0)."""
    ids = [int(i) for i in torch.unique(instances) if i > 0]
    masks = torch.stack([instances[0] == i for i in ids]) if ids else None
    dims = instances.dim() - 1
    if masks is None:
        return {
            "boxes": torch.zeros((0, 2 * dims)),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros((0, *instances.shape[1:]), dtype=torch.bool),
        }
    return {
        "boxes": mask_boxes(masks),
        "labels": torch.full((len(ids),), max(int(kind) - 1, 0), dtype=torch.int64),
        "masks": masks,
    }


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """The half-open bounding box ``(lo..., hi...)`` of each non-empty mask ``(k, *spatial)``."""
    dims = masks.dim() - 1
    boxes = torch.zeros((masks.shape[0], 2 * dims))
    for i, mask in enumerate(masks):
        where = torch.nonzero(mask)
        boxes[i, :dims] = where.min(0).values
        boxes[i, dims:] = where.max(0).values + 1
    return boxes


def masks_in_boxes(
    classes: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Per box, the voxels inside it that the semantic map ``classes`` gives its class
    (object class ``c`` is segmentation class ``c + 1``)."""
    masks = torch.zeros((boxes.shape[0], *classes.shape), dtype=torch.bool, device=classes.device)
    dims = classes.dim()
    for i, (box, label) in enumerate(zip(boxes, labels, strict=True)):
        region = tuple(
            slice(max(int(box[d].floor()), 0), int(box[d + dims].ceil())) for d in range(dims)
        )
        masks[i][region] = classes[region] == label + 1
    return masks


def semantic_map(target: Mapping[str, torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """The long label map ``(1, *shape)`` of an instance target: object class + 1 on its
    masks, 0 elsewhere."""
    out = torch.zeros((1, *shape), dtype=torch.int64, device=target["masks"].device)
    for mask, label in zip(target["masks"], target["labels"], strict=True):
        out[0][mask.bool()] = label + 1
    return out


def _union(
    masks: torch.Tensor | None,
    labels: torch.Tensor,
    shape: tuple[int, ...],
    keep: torch.Tensor | None = None,
) -> np.ndarray:
    """The label map of instance masks (object class + 1), zeros without masks."""
    if masks is None:
        return np.zeros(shape, dtype=np.int64)
    if keep is not None:
        masks, labels = masks[keep], labels[keep]
    return semantic_map({"masks": masks, "labels": labels}, shape)[0].cpu().numpy()


def _unnest_target(sample: dict[str, Any]) -> dict[str, Any]:
    return {"image": sample["image"], **sample["label"]}


def _nest_target(sample: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    target = {key: torch.as_tensor(sample[key]) for key in keys}
    if "masks" in target:
        target["masks"] = target["masks"].bool()
    return {"image": torch.as_tensor(sample["image"]), "label": target}


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
register_task(DetectionTask)
register_task(InstanceTask)
