"""ShuffleNet V1 (Zhang et al. 2018, table 1, g = 3) and V2 (Ma et al. 2018, table 5, 1x)
as adapted to 32x32 inputs by the KD zoo: the 3x3 stride-2 stem and its max-pool are
replaced by a 1x1 conv-BN-ReLU to 24 channels, so the three stages run at 16, 8 and
4 pixels. The zoo's V1 unit also applies ReLU after the depthwise conv; kept here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdcore.common import params
from kdcore_vision.features import Backbone, Features


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` groups: ``[N, g*k, H, W] -> [N, k*g, H, W]``."""
    if groups == 1:
        return x
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = False
            ) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 -> shuffle -> 3x3 depthwise -> grouped 1x1. Stride 2 concatenates a 3x3
    average-pooled shortcut (the branch then yields ``cout - cin`` channels); stride 1 adds
    the input. The first grouped 1x1 of the network (on the 24-channel stem) is ungrouped."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        branch = cout - cin if stride == 2 else cout
        mid = branch // 4
        self.shuffle_groups = 1 if cin == 24 else groups
        self.reduce = conv_bn(cin, mid, 1, groups=self.shuffle_groups, relu=True)
        self.depthwise = conv_bn(mid, mid, 3, stride, groups=mid, relu=True)
        self.expand = conv_bn(mid, branch, 1, groups=groups)

    def forward(self, x: Tensor) -> Tensor:
        out = self.expand(self.depthwise(channel_shuffle(self.reduce(x), self.shuffle_groups)))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleV2Down(nn.Module):
    """Spatial down-sampling unit: two stride-2 branches, each giving ``cout / 2`` channels."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(conv_bn(cin, cin, 3, 2, groups=cin), conv_bn(cin, mid, 1, relu=True))
        self.right = nn.Sequential(conv_bn(cin, mid, 1, relu=True), conv_bn(mid, mid, 3, 2, groups=mid),
                                   conv_bn(mid, mid, 1, relu=True))

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleV2Unit(nn.Module):
    """Basic unit: split channels in halves, transform the second, concatenate, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(conv_bn(half, half, 1, relu=True), conv_bn(half, half, 3, groups=half),
                                    conv_bn(half, half, 1, relu=True))

    def forward(self, x: Tensor) -> Tensor:
        keep, change = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([keep, self.branch(change)], 1), 2)


class ShuffleNetV1(Backbone):
    """``shufflenetv1`` (g = 3; 240/480/960 channels; 4/8/4 units). Stages: stem and the
    three stage outputs; pooled: global average of the last."""

    def __init__(self, num_classes: int = 100):
        super().__init__()
        params.positive_int("num_classes", num_classes)
        self.stem = conv_bn(3, 24, 1, relu=True)
        cin, stages = 24, []
        for width, n in zip((240, 480, 960), (4, 8, 4)):
            units = [ShuffleV1Unit(cin if i == 0 else width, width, 2 if i == 0 else 1, 3) for i in range(n)]
            stages.append(nn.Sequential(*units))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward_features(self, x: Tensor) -> Features:
        x = self.stem(x)
        maps = [x]
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return Features(maps, F.adaptive_avg_pool2d(x, 1).flatten(1))


class ShuffleNetV2(Backbone):
    """``shufflenetv2`` (1x: 116/232/464 channels, 3/7/3 basic units after each down unit,
    1x1 conv to 1024). Stages: stem and the three stage outputs; pooled: global average of
    the final 1x1 conv."""

    def __init__(self, num_classes: int = 100):
        super().__init__()
        params.positive_int("num_classes", num_classes)
        self.stem = conv_bn(3, 24, 1, relu=True)
        cin, stages, last = 24, [], 1024
        for width, n in zip((116, 232, 464), (3, 7, 3)):
            stages.append(nn.Sequential(ShuffleV2Down(cin, width), *[ShuffleV2Unit(width) for _ in range(n)]))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.head = conv_bn(cin, last, 1, relu=True)
        self.fc = nn.Linear(last, num_classes)

    def forward_features(self, x: Tensor) -> Features:
        x = self.stem(x)
        maps = [x]
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return Features(maps, F.adaptive_avg_pool2d(self.head(x), 1).flatten(1))
