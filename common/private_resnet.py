"""MONAI's ResNet blocks with the residual added out of place, for DP-SGD.

MONAI's ``ResNetBlock`` and ``ResNetBottleneck`` end with ``out += residual``. Under Opacus,
the last normalisation layer's output is a view made by its per-sample backward hook, and
PyTorch forbids modifying it in place ("Output 0 of BackwardHookFunction is a view and is being
modified inplace"): every DP-SGD step of ``resnet18`` failed at every site. These subclasses
compute the same function with ``out + residual``; their state-dict keys are MONAI's.
"""

from __future__ import annotations

import torch
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck


class OutOfPlaceResNetBlock(ResNetBlock):
    """``ResNetBlock`` with ``out = out + residual``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.act(out + residual)  # type: ignore[no-any-return]


class OutOfPlaceResNetBottleneck(ResNetBottleneck):
    """``ResNetBottleneck`` with ``out = out + residual``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.act(out + residual)  # type: ignore[no-any-return]


#: MONAI block class -> its out-of-place twin.
OUT_OF_PLACE = {ResNetBlock: OutOfPlaceResNetBlock, ResNetBottleneck: OutOfPlaceResNetBottleneck}
