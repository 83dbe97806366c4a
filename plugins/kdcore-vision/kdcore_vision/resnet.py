"""Residual networks of the CIFAR-100 KD zoo (CRD, DKD, NKD, ABKD experiments).

* ``resnet{8,14,20,32,44,56,110}``: He et al. 2016, "Deep Residual Learning",
  sec. 4.2 -- a 3x3 stem and three stages of ``n = (depth - 2) / 6`` basic
  blocks with 16/32/64 channels at 32/16/8 pixels; ``resnet8x4`` and
  ``resnet32x4`` widen the stem to 32 and the stages to 64/128/256 (CRD, Tian
  et al. 2020). Where a block changes shape the shortcut is a strided 1x1
  conv + BN (the zoo's choice, He et al.'s "option B").
* ``resnet18/34/50``: the four-stage ImageNet ResNets with the 7x7 stem and
  max-pool replaced by one 3x3 stride-1 conv, so 32x32 inputs give
  32/16/8/4-pixel stages of 64/128/256/512 (x4 for bottlenecks) channels.

Pooling is global average pooling, identical to the zoo's fixed 8x8 (or 4x4)
average pool on 32x32 inputs and usable on any input size.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from kdcore.common import params
from kdcore_vision.features import Backbone, Features, init_conv_bn


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]


def projection(cin: int, cout: int, stride: int) -> nn.Module:
    """Identity shortcut where shapes agree, else a strided 1x1 conv + BN."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(*conv_bn(cin, cout, 1, stride))


class BasicBlock(nn.Module):
    """``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.residual = nn.Sequential(*conv_bn(cin, planes, 3, stride), nn.ReLU(inplace=True),
                                      *conv_bn(planes, planes, 3))
        self.shortcut = projection(cin, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand to ``4 * planes``, plus shortcut."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.residual = nn.Sequential(*conv_bn(cin, planes, 1), nn.ReLU(inplace=True),
                                      *conv_bn(planes, planes, 3, stride), nn.ReLU(inplace=True),
                                      *conv_bn(planes, cout, 1))
        self.shortcut = projection(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


class ResNet(Backbone):
    """A 3x3 conv-BN-ReLU stem, then one stage per entry of ``blocks`` (first stride 1,
    later stages stride 2), global average pooling and a linear classifier."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], blocks: Sequence[int],
                 stem: int, widths: Sequence[int], num_classes: int):
        super().__init__()
        params.positive_int("num_classes", num_classes)
        self.stem = nn.Sequential(*conv_bn(3, stem, 3), nn.ReLU(inplace=True))
        cin, stages = stem, []
        for i, (n, planes) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                layers.append(block(cin, planes, 2 if i > 0 and j == 0 else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(cin, num_classes)
        init_conv_bn(self)

    def forward_features(self, x: Tensor) -> Features:
        x = self.stem(x)
        maps = [x]
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return Features(maps, F.adaptive_avg_pool2d(x, 1).flatten(1))


def cifar_resnet(depth: int, stem: int = 16, widths: Sequence[int] = (16, 32, 64)):
    """Factory of the 3-stage CIFAR ResNet with ``depth = 6n + 2`` layers."""

    def build(num_classes: int = 100) -> ResNet:
        return ResNet(BasicBlock, [(depth - 2) // 6] * 3, stem, widths, num_classes)

    build.__doc__ = f"CIFAR ResNet-{depth}: {stem}-channel stem, {'/'.join(map(str, widths))}-channel stages."
    return build


def four_stage_resnet(block: type[BasicBlock] | type[Bottleneck], blocks: Sequence[int]):
    """Factory of a 4-stage ImageNet ResNet with a CIFAR (3x3, stride 1, no max-pool) stem."""

    def build(num_classes: int = 100) -> ResNet:
        return ResNet(block, blocks, 64, [64, 128, 256, 512], num_classes)

    build.__doc__ = f"ImageNet ResNet, {'/'.join(map(str, blocks))} {block.__name__}s, 3x3 CIFAR stem."
    return build
