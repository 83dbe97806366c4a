"""MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
table 2) as used on CIFAR by the KD zoo: width multiplier 0.5 ("mobile_half"),
expansion 6, ReLU activations, the stride-2 stem kept, so a 32x32 input ends at 2x2
before the 1x1 conv to 1280 channels, global average pooling and a linear classifier.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from kdcore.common import params
from kdcore_vision.features import Backbone, Features, init_conv_bn

#: (expansion (None = the network's), channels, blocks, first stride) per group (table 2)
GROUPS = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
          (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1)]
#: groups after which a stage map is taken (the last group at each resolution)
STAGE_ENDS = (1, 2, 4, 6)


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class InvertedResidual(nn.Module):
    """1x1 expand (x t) -> 3x3 depthwise (strided) -> 1x1 linear projection; residual where
    the shape is kept. The expansion conv is present even for t = 1, as in the zoo."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        mid = cin * expansion
        self.body = nn.Sequential(*conv_bn_relu(cin, mid, 1), *conv_bn_relu(mid, mid, 3, stride, mid),
                                  nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(Backbone):
    """``mobilenetv2``. Stages: stem, then the outputs at 16, 8, 4 and 2 pixels (32x32
    input); pooled: global average of the final 1x1 conv (1280 channels)."""

    def __init__(self, num_classes: int = 100, width_mult: float = 0.5, expansion: int = 6):
        super().__init__()
        params.positive_int("num_classes", num_classes)
        width_mult = params.positive("width_mult", width_mult)
        params.positive_int("expansion", expansion)
        cin = int(32 * width_mult)
        self.stem = nn.Sequential(*conv_bn_relu(3, cin, 3, 2))
        groups = []
        for t, c, n, s in GROUPS:
            cout = int(c * width_mult)
            groups.append(nn.Sequential(*[
                InvertedResidual(cin if i == 0 else cout, cout, s if i == 0 else 1, t or expansion)
                for i in range(n)]))
            cin = cout
        self.groups = nn.ModuleList(groups)
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.head = nn.Sequential(*conv_bn_relu(cin, last, 1))
        self.fc = nn.Linear(last, num_classes)
        init_conv_bn(self)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: Tensor) -> Features:
        x = self.stem(x)
        maps = [x]
        for i, group in enumerate(self.groups):
            x = group(x)
            if i in STAGE_ENDS:
                maps.append(x)
        return Features(maps, F.adaptive_avg_pool2d(self.head(x), 1).flatten(1))
