"""The CIFAR backbone zoo: registry name -> factory ``(num_classes=100, ...) -> Backbone``.

The names and architectures are those of the CIFAR-100 experiments of CRD (Tian et
al. 2020), DKD (Zhao et al. 2022), NKD (Yang et al. 2023) and ABKD (Wang et al.
2025); ``PARAMETERS`` holds each model's parameter count for 100 classes (checked
by the tests and listed in docs/methods/vision.md).
"""

from __future__ import annotations

from collections.abc import Callable

from kdcore_vision.features import Backbone
from kdcore_vision.mobilenetv2 import MobileNetV2
from kdcore_vision.resnet import BasicBlock, Bottleneck, cifar_resnet, four_stage_resnet
from kdcore_vision.shufflenet import ShuffleNetV1, ShuffleNetV2
from kdcore_vision.vgg import vgg
from kdcore_vision.wrn import wide_resnet

CIFAR_MODELS: dict[str, Callable[..., Backbone]] = {
    **{f"resnet{d}": cifar_resnet(d) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": cifar_resnet(8, 32, (64, 128, 256)),
    "resnet32x4": cifar_resnet(32, 32, (64, 128, 256)),
    "resnet18": four_stage_resnet(BasicBlock, (2, 2, 2, 2)),
    "resnet34": four_stage_resnet(BasicBlock, (3, 4, 6, 3)),
    "resnet50": four_stage_resnet(Bottleneck, (3, 4, 6, 3)),
    **{f"wrn_{d}_{k}": wide_resnet(d, k) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{f"vgg{d}": vgg(d) for d in (8, 11, 13, 16, 19)},
    "mobilenetv2": MobileNetV2,
    "shufflenetv1": ShuffleNetV1,
    "shufflenetv2": ShuffleNetV2,
}
