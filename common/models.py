"""Classification networks by name: one registry, ``build_model(name, ...)`` and ``list_models()``.

Modelled on timm's ``_registry.py`` / ``_factory.py``. Each entry is a short factory over a MONAI
network, with MONAI's argument names (``spatial_dims``, ``in_channels``, ``out_channels``). Every
model returns raw logits of shape ``(N, out_channels)``, works in 2D and 3D, and is built with
random weights: nothing is ever downloaded.

Stems
-----
MONAI 1.6's ``ResNet`` defaults to a 7x7 stride-1 first convolution followed by a stride-2 max
pool, so ``layer1`` runs at half the input resolution and the network downsamples 16x, not 32x as
in the original ResNet (He et al. 2016). On the 64-128 px images RadFL trains on, that makes every
residual stage four times (2D) or eight times (3D) costlier. Measured with
``python -m simulations.bench.stems`` (2D, batch 16, 1 channel, 2 classes, forward + backward,
2 CPU threads on a shared 2-core VM, median of 3 after 1 warm-up, the two stems interleaved):

========  ===  =====================  =====================  ========
model     px   MONAI default 7x7 s1   chosen 7x7 s2 + pool   speed-up
========  ===  =====================  =====================  ========
resnet18  64   359 ms, 45 img/s       103 ms, 156 img/s      3.5x
resnet18  128  1557 ms, 10 img/s      356 ms, 45 img/s       4.4x
resnet50  64   967 ms, 17 img/s       336 ms, 48 img/s       2.9x
resnet50  128  4965 ms, 3 img/s       1038 ms, 15 img/s      4.8x
========  ===  =====================  =====================  ========

Without interleaving, absolute times on that VM varied up to 3x between runs; two interleaved
runs agreed within 15% per cell and gave speed-ups of 2.9x-4.8x. Two other stems were timed
once on resnet18 at 64 px: 3x3 stride 1 without max pool (the CIFAR variant, 8x downsampling)
took about 1600 ms, 3x the MONAI default; 3x3 stride 2 without max pool (16x) about 370 ms, 3x
the chosen stem. RadFL's ResNets therefore use the original stem,
:data:`RESNET_STEM`: 7x7 stride 2, then a stride-2 max pool, for a 32x downsampling (64 px ->
2x2, 128 px -> 4x4 final feature map), the same total stride as DenseNet-121 and EfficientNet-B0
below. MONAI's own ``ResNetFeatures`` (MedicalNet) uses the same stride-2 stem in 3D. A caller
can still pass ``conv1_t_size``, ``conv1_t_stride`` or ``no_max_pool`` to :func:`build_model`.

MONAI's ``DenseNet121`` already has the original stem (7x7 stride 2 + stride-2 max pool) and
``EfficientNetBN("efficientnet-b0")`` the original 3x3 stride-2 stem; neither needs a change.
EfficientNet's TensorFlow-style "same" padding is computed once for its 224 px design size; on
other sizes it still runs, with the padding of a strided layer at most one pixel off "same".
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, Protocol, TypeVar

import torch
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork
from monai.networks.layers import Conv, Norm, Pool
from monai.networks.nets import (
    DenseNet121,
    DynUNet,
    EfficientNetBN,
    SegResNet,
    UNet,
    resnet18,
    resnet34,
    resnet50,
)
from torch import nn

from common.errors import ConfigError, RegistryError

__all__ = [
    "RESNET_STEM",
    "ModelFactory",
    "SmallCNN",
    "build_model",
    "list_models",
    "register_model",
]

#: First-convolution settings RadFL's ResNets use, in MONAI ``ResNet`` argument names.
RESNET_STEM: Final[Mapping[str, Any]] = MappingProxyType(
    {"conv1_t_size": 7, "conv1_t_stride": 2, "no_max_pool": False}
)

_SPATIAL_DIMS: Final[tuple[int, ...]] = (2, 3)


class ModelFactory(Protocol):
    """A function that builds one registered network with random weights."""

    def __call__(
        self, *, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any
    ) -> nn.Module: ...


_FactoryT = TypeVar("_FactoryT", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}
#: The task each model's output serves (``classification``: logits ``(N, C)``; ``segmentation``:
#: ``(N, C, *spatial)``; ``detection``: RetinaNet head outputs).
_TASK_OF: dict[str, str] = {}


def register_model(name: str, task: str = "classification") -> Callable[[_FactoryT], _FactoryT]:
    """Register a model factory under ``name``.

    Parameters
    ----------
    name
        Public name of the model, as passed to :func:`build_model`. One name per model.

    Returns
    -------
    Callable
        A decorator that records the factory and returns it unchanged.

    Raises
    ------
    RegistryError
        If ``name`` is empty or already registered.
    """
    if not isinstance(name, str) or not name:
        raise RegistryError(f"register_model: name must be a non-empty string, got {name!r}")

    def decorator(factory: _FactoryT) -> _FactoryT:
        if name in _REGISTRY:
            raise RegistryError(f"register_model: model name {name!r} is already registered")
        _REGISTRY[name] = factory
        _TASK_OF[name] = task
        return factory

    return decorator


def list_models(task: str | None = None) -> list[str]:
    """Return the registered model names, sorted.

    Returns
    -------
    list[str]
        Every name :func:`build_model` accepts.
    """
    return sorted(n for n in _REGISTRY if task is None or _TASK_OF[n] == task)


def model_task(name: str) -> str:
    """The task a registered model's output serves."""
    if name not in _TASK_OF:
        raise RegistryError(f"unknown model name {name!r}; known names: {', '.join(list_models())}")
    return _TASK_OF[name]


def build_model(
    name: str,
    *,
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int = 2,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model with random weights.

    Parameters
    ----------
    name
        A name from :func:`list_models`.
    spatial_dims
        2 for images, 3 for volumes.
    in_channels
        Number of input channels (1 for most radiology images).
    out_channels
        Number of logits per sample (the number of classes).
    **kwargs
        Further arguments for the underlying MONAI network, in MONAI's names
        (for example ``conv1_t_stride`` for a ResNet, ``dropout_prob`` for DenseNet-121).

    Returns
    -------
    torch.nn.Module
        A network mapping ``(N, in_channels, *spatial)`` to logits of shape ``(N, out_channels)``.

    Raises
    ------
    RegistryError
        If ``name`` is not registered; the message lists the known names.
    ConfigError
        If ``spatial_dims`` is not 2 or 3, ``in_channels`` or ``out_channels`` is not a positive
        integer, or ``pretrained`` is passed (weights are never downloaded).
    """
    if name not in _REGISTRY:
        known = ", ".join(list_models())
        raise RegistryError(f"build_model: unknown model name {name!r}; known names: {known}")
    if spatial_dims not in _SPATIAL_DIMS:
        raise ConfigError(f"build_model: spatial_dims must be 2 or 3, got {spatial_dims!r}")
    for arg_name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"build_model: {arg_name} must be a positive integer, got {value!r}")
    if "pretrained" in kwargs:
        raise ConfigError(
            "build_model: pretrained is not supported; RadFL models start from random weights"
        )
    return _REGISTRY[name](
        spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs
    )


def _resnet_kwargs(
    spatial_dims: int, in_channels: int, out_channels: int, kwargs: dict[str, Any]
) -> dict[str, Any]:
    # RESNET_STEM first so that a caller's conv1_t_* / no_max_pool override it.
    return {
        **RESNET_STEM,
        **kwargs,
        "spatial_dims": spatial_dims,
        "n_input_channels": in_channels,
        "num_classes": out_channels,
    }


@register_model("resnet18")
def _build_resnet18(
    *, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any
) -> nn.Module:
    return resnet18(
        pretrained=False, **_resnet_kwargs(spatial_dims, in_channels, out_channels, kwargs)
    )


@register_model("resnet34")
def _build_resnet34(
    *, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any
) -> nn.Module:
    return resnet34(
        pretrained=False, **_resnet_kwargs(spatial_dims, in_channels, out_channels, kwargs)
    )


@register_model("resnet50")
def _build_resnet50(
    *, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any
) -> nn.Module:
    return resnet50(
        pretrained=False, **_resnet_kwargs(spatial_dims, in_channels, out_channels, kwargs)
    )


@register_model("densenet121")
def _build_densenet121(
    *, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any
) -> nn.Module:
    return DenseNet121(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        pretrained=False,
        **kwargs,
    )


@register_model("efficientnet-b0")
def _build_efficientnet_b0(
    *, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any
) -> nn.Module:
    return EfficientNetBN(
        "efficientnet-b0",
        pretrained=False,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=out_channels,
        **kwargs,
    )


class SmallCNN(nn.Module):
    """A few strided conv + batch norm + ReLU blocks, global average pooling and a linear layer.

    Meant for tests and quick simulations, not for accuracy.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    in_channels
        Number of input channels.
    out_channels
        Number of logits per sample.
    channels
        Width of each block; each block halves the spatial size.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: tuple[int, ...] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if not channels:
            raise ConfigError("SmallCNN: channels must name at least one block width")
        conv_type = Conv[Conv.CONV, spatial_dims]
        norm_type = Norm[Norm.BATCH, spatial_dims]
        layers: list[nn.Module] = []
        width_in = in_channels
        for width in channels:
            layers += [
                conv_type(width_in, width, kernel_size=3, stride=2, padding=1, bias=False),
                norm_type(width),
                nn.ReLU(inplace=True),
            ]
            width_in = width
        self.features = nn.Sequential(*layers)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.fc = nn.Linear(width_in, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(N, out_channels)`` for ``x`` of shape ``(N, C, *spatial)``."""
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register_model("small-cnn")
def _build_small_cnn(
    *, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any
) -> nn.Module:
    return SmallCNN(
        spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs
    )


# ------------------------------------------------------------------ segmentation networks
# These map (N, C, *spatial) to per-voxel logits (N, out_channels, *spatial); the spatial size
# must be divisible by 16 (four downsamplings).


@register_model("unet", task="segmentation")
def _build_unet(
    *, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any
) -> nn.Module:
    """MONAI's residual U-Net (Ronneberger et al., 2015; Kerfoot et al., 2018)."""
    settings: dict[str, Any] = {
        "channels": (16, 32, 64, 128, 256),
        "strides": (2, 2, 2, 2),
        "num_res_units": 2,
        **kwargs,
    }
    return UNet(
        spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **settings
    )


@register_model("segresnet", task="segmentation")
def _build_segresnet(
    *, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any
) -> nn.Module:
    """MONAI's SegResNet (Myronenko, 2018) without the VAE branch."""
    settings: dict[str, Any] = {"init_filters": 16, "blocks_down": (1, 2, 2, 4), **kwargs}
    return SegResNet(
        spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **settings
    )


@register_model("dynunet", task="segmentation")
def _build_dynunet(
    *, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any
) -> nn.Module:
    """MONAI's DynUNet, the nnU-Net architecture (Isensee et al., 2021), five levels."""
    settings: dict[str, Any] = {
        "kernel_size": [3, 3, 3, 3, 3],
        "strides": [1, 2, 2, 2, 2],
        "upsample_kernel_size": [2, 2, 2, 2],
        "filters": [16, 32, 64, 128, 256],
        "res_block": True,
        **kwargs,
    }
    return DynUNet(
        spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **settings
    )


# ---------------------------------------------------------------------- detection networks
class ResNetFPN(nn.Module):
    """A ResNet-18 trunk (stride-2 stem, no max pool) under a feature pyramid network.

    MONAI's own ``resnet_fpn_feature_extractor`` needs torchvision; this is the same idea on
    MONAI blocks. Returns the pyramid's maps at strides 2, 4 and 8 (``FEATURE_STRIDES``), each
    with ``out_channels`` channels, as RetinaNet expects.
    """

    FEATURE_STRIDES = (2, 4, 8)

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int = 64) -> None:
        super().__init__()
        trunk = resnet18(
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            no_max_pool=True,
            num_classes=1,
        )
        self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.act)
        self.layers = nn.ModuleList([trunk.layer1, trunk.layer2, trunk.layer3])
        self.fpn = FeaturePyramidNetwork(spatial_dims, [64, 128, 256], out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features: OrderedDict[str, torch.Tensor] = OrderedDict()
        x = self.stem(x)
        for index, layer in enumerate(self.layers):
            x = layer(x)
            features[f"level{index}"] = x
        return self.fpn(features)  # type: ignore[no-any-return]


#: Anchors per feature-map location of the RetinaNet below.
RETINANET_ANCHORS = 3


@register_model("retinanet", task="detection")
def _build_retinanet(
    *, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any
) -> nn.Module:
    """MONAI's RetinaNet (Lin et al., 2017: FPN, focal loss) on :class:`ResNetFPN`;
    ``out_channels`` object classes. Training and box decoding need a detector around it
    (``common.tasks.DetectionTask``)."""
    return RetinaNet(
        spatial_dims=spatial_dims,
        num_classes=out_channels,
        num_anchors=RETINANET_ANCHORS,
        feature_extractor=ResNetFPN(spatial_dims, in_channels),
        size_divisible=8,
        **kwargs,
    )


# ------------------------------------------------------------ instance segmentation networks
#: The key of the semantic segmentation logits in a Retina U-Net's outputs.
SEGMENTATION_KEY: Final = "segmentation"


class RetinaUNet(RetinaNet):
    """Retina U-Net (Jaeger et al., 2020): RetinaNet plus a semantic segmentation head.

    The head upsamples the finest pyramid level (stride 2) to the input grid, joins it with
    features of the input image itself (U-Net's top skip connection) and predicts
    ``num_classes + 1`` channels (background first). Outputs RetinaNet's classification and
    box-regression maps and, under ``SEGMENTATION_KEY``, the segmentation logits. Instances are
    the detected boxes, each masked by the segmentation of its class inside the box
    (``common.tasks.InstanceTask``).
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, num_classes: int, width: int = 32
    ) -> None:
        extractor = ResNetFPN(spatial_dims, in_channels)
        super().__init__(
            spatial_dims=spatial_dims,
            num_classes=num_classes,
            num_anchors=RETINANET_ANCHORS,
            feature_extractor=extractor,
            size_divisible=8,
        )
        conv = Conv[Conv.CONV, spatial_dims]
        norm = Norm[Norm.BATCH, spatial_dims]
        pyramid = extractor.out_channels
        self.upsample = nn.Upsample(
            scale_factor=2, mode="bilinear" if spatial_dims == 2 else "trilinear"
        )
        self.image_features = nn.Sequential(
            conv(in_channels, width // 2, 3, padding=1), norm(width // 2), nn.ReLU(inplace=True)
        )
        self.segmentation_head = nn.Sequential(
            conv(pyramid + width // 2, width, 3, padding=1),
            norm(width),
            nn.ReLU(inplace=True),
            conv(width, num_classes + 1, 1),
        )

    def forward(self, images: torch.Tensor) -> dict[str, Any]:  # type: ignore[override]
        maps = list(self.feature_extractor(images).values())
        finest = self.upsample(maps[0])
        joined = torch.cat([finest, self.image_features(images)], dim=1)
        return {
            self.cls_key: self.classification_head(maps),
            self.box_reg_key: self.regression_head(maps),
            SEGMENTATION_KEY: self.segmentation_head(joined),
        }


@register_model("retina-unet", task="instance")
def _build_retina_unet(
    *, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any
) -> nn.Module:
    """:class:`RetinaUNet` with ``out_channels`` object classes."""
    return RetinaUNet(spatial_dims, in_channels, out_channels, **kwargs)
