"""VGG with batch norm for 32x32 inputs (Simonyan & Zisserman 2015, table 1, configurations
A/B/D/E, plus the 8-layer "S" of the CRD zoo): five blocks of 3x3 conv-BN-ReLU layers,
2x2 max-pooling after each of the first three, global average pooling and a single
linear classifier on the 512-channel output (the fully connected layers of the
ImageNet VGG are dropped, as in the KD zoo).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from kdcore.common import params
from kdcore_vision.features import Backbone, Features, init_conv_bn

#: conv widths per block; 8 = CRD's "S", 11/13/16/19 = VGG configurations A/B/D/E
CONFIGS: dict[int, list[list[int]]] = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    19: [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


class VGG(Backbone):
    """``vgg{8,11,13,16,19}`` (with BN). Stages: the five block outputs (after ReLU, before
    pooling); pooled: their global average."""

    def __init__(self, config: Sequence[Sequence[int]], num_classes: int = 100):
        super().__init__()
        params.positive_int("num_classes", num_classes)
        cin, blocks = 3, []
        for widths in config:
            layers: list[nn.Module] = []
            for w in widths:
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(cin, num_classes)
        init_conv_bn(self)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: Tensor) -> Features:
        maps = []
        for i, block in enumerate(self.blocks):
            if 0 < i < 4:
                x = F.max_pool2d(x, 2)
            x = block(x)
            maps.append(x)
        return Features(maps, F.adaptive_avg_pool2d(x, 1).flatten(1))


def vgg(depth: int):
    """Factory of ``vgg{depth}`` with batch norm."""

    def build(num_classes: int = 100) -> VGG:
        return VGG(CONFIGS[depth], num_classes)

    build.__doc__ = f"VGG-{depth} with batch norm for 32x32 inputs."
    return build
