"""Wide residual networks ``wrn_{depth}_{k}`` (Zagoruyko & Komodakis 2016, "Wide Residual
Networks", table 1): a 3x3 conv to 16 channels, three stages of ``n = (depth - 4) / 6``
pre-activation basic blocks with ``16k / 32k / 64k`` channels (strides 1, 2, 2), then
BN-ReLU, global average pooling and a linear classifier. Dropout is not used (the
KD zoo trains without it).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from kdcore.common import params
from kdcore_vision.features import Backbone, Features, init_conv_bn


class PreActBlock(nn.Module):
    """``conv(relu(bn(conv(relu(bn(x)))))) + shortcut``; where the shape changes, the
    shortcut is a strided 1x1 conv applied to the pre-activated input ``relu(bn(x))``."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=False))
        self.residual = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False))
        self.project = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = self.pre(x)
        return self.residual(a) + (x if self.project is None else self.project(a))


class WideResNet(Backbone):
    """``wrn_{depth}_{widen}``; stages: stem conv, the three block groups (pre-activation
    outputs); pooled: global average of ``relu(bn(last stage))``."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100):
        super().__init__()
        params.positive_int("num_classes", num_classes)
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        cin, stages = 16, []
        for i, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
            blocks = [PreActBlock(cin if j == 0 else width, width, 2 if i > 0 and j == 0 else 1)
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.post = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self.fc = nn.Linear(cin, num_classes)
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: Tensor) -> Features:
        x = self.stem(x)
        maps = [x]
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return Features(maps, F.adaptive_avg_pool2d(self.post(x), 1).flatten(1))


def wide_resnet(depth: int, widen: int):
    """Factory of ``wrn_{depth}_{widen}``."""

    def build(num_classes: int = 100) -> WideResNet:
        return WideResNet(depth, widen, num_classes)

    build.__doc__ = f"Wide ResNet, depth {depth}, widening factor {widen}."
    return build
