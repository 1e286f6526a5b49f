"""Tests of the model registry: every registered model builds, runs forward and backward."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from common import models
from common.errors import ConfigError, RegistryError
from common.models import build_model, list_models, register_model

BATCH_SIZE = 2
IN_CHANNELS = 1
OUT_CHANNELS = 3
# 32 px survives the 32x downsampling of every registered model (final feature map 1 px).
SPATIAL_SHAPE = {2: (32, 32), 3: (32, 32, 32)}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", list_models("classification"))
def test_model_forward_backward(name: str, spatial_dims: int) -> None:
    torch.manual_seed(0)
    model = build_model(
        name, spatial_dims=spatial_dims, in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS
    )
    model.train()
    images = torch.randn(BATCH_SIZE, IN_CHANNELS, *SPATIAL_SHAPE[spatial_dims])

    logits = model(images)

    assert logits.shape == (BATCH_SIZE, OUT_CHANNELS)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


def test_unknown_name_raises_and_lists_known_names() -> None:
    with pytest.raises(RegistryError, match="no-such-model") as excinfo:
        build_model("no-such-model")
    assert "resnet18" in str(excinfo.value)


def test_duplicate_registration_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    # A copy of the registry, so that the temporary entry does not leak into other tests.
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))

    def factory(
        *, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any
    ) -> nn.Module:
        return nn.Linear(in_channels, out_channels)

    register_model("test-only-linear")(factory)
    assert "test-only-linear" in list_models()
    with pytest.raises(RegistryError, match="test-only-linear"):
        register_model("test-only-linear")(factory)
    with pytest.raises(RegistryError, match="resnet18"):
        register_model("resnet18")(factory)


@pytest.mark.parametrize("spatial_dims", [1, 4, 0])
def test_bad_spatial_dims_raises(spatial_dims: int) -> None:
    with pytest.raises(ConfigError, match="spatial_dims"):
        build_model("small-cnn", spatial_dims=spatial_dims)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", list_models("segmentation"))
def test_segmentation_models_give_a_map_per_class(name: str, spatial_dims: int) -> None:
    model = build_model(name, spatial_dims=spatial_dims, out_channels=OUT_CHANNELS)
    images = torch.randn(BATCH_SIZE, IN_CHANNELS, *SPATIAL_SHAPE[spatial_dims])
    out = model(images)
    assert out.shape == (BATCH_SIZE, OUT_CHANNELS, *SPATIAL_SHAPE[spatial_dims])
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_retinanet_gives_class_and_box_maps_per_pyramid_level(spatial_dims: int) -> None:
    from common.models import RETINANET_ANCHORS, ResNetFPN

    model = build_model("retinanet", spatial_dims=spatial_dims, out_channels=OUT_CHANNELS)
    out = model(torch.randn(BATCH_SIZE, IN_CHANNELS, *SPATIAL_SHAPE[spatial_dims]))
    assert len(out["classification"]) == len(ResNetFPN.FEATURE_STRIDES)
    for level, stride in enumerate(ResNetFPN.FEATURE_STRIDES):
        side = SPATIAL_SHAPE[spatial_dims][0] // stride
        assert out["classification"][level].shape == (
            BATCH_SIZE,
            RETINANET_ANCHORS * OUT_CHANNELS,
            *(side,) * spatial_dims,
        )
        assert out["box_regression"][level].shape[1] == RETINANET_ANCHORS * 2 * spatial_dims


def test_a_task_refuses_a_network_built_for_another_task() -> None:
    from common.config import ClientConfig, default_run_config, from_run_config
    from common.tasks import get_task

    config = from_run_config(ClientConfig, {**default_run_config(), "model": "unet"})
    with pytest.raises(ConfigError, match="segmentation network"):
        get_task(config.model_config)


def test_radfl_models_lists_the_networks_of_each_task(capsys) -> None:
    from common.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "segmentation models:" in out and "unet" in out and "retinanet" in out
