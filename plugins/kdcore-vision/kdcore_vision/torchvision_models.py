"""Every torchvision classification model as backbone ``tv.NAME``, untrained.

``create("backbone", "tv.resnet18", num_classes=10)`` builds
``torchvision.models.get_model("resnet18", weights=None, num_classes=10)``; other
keyword parameters go to torchvision's builder (e.g. ``image_size`` of the ViTs,
``dropout``). Pretrained weights are refused: they would be downloaded at run time.
GoogLeNet and Inception-v3 are built without auxiliary heads (``aux_logits=False``)
so that ``forward`` returns plain logits.

The wrapped model is ``backbone.net`` (so torchvision state dicts load with
``backbone.net.load_state_dict``). Features are recorded by forward hooks, only
when asked for:

* ``pooled``: the input of the last ``nn.Linear`` (the classifier; for VGG/AlexNet
  and MobileNetV3 the output of their hidden FC layers). SqueezeNet, whose
  classifier is a conv, gets the global average of its last stage.
* ``stages``: the outputs of the trunk's top-level blocks (the model's children,
  with ``nn.Sequential`` / ``nn.ModuleList`` children opened one level), of which
  the last one at each spatial resolution is kept: stem, then one map per
  resolution stage, ``[B, C, H, W]`` (Swin's channels-last maps are permuted to
  this layout). ViTs have no resolutions: their stages are the token outputs
  ``[B, T, D]`` of every encoder block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from kdcore.common.errors import ConfigError
from kdcore_vision.features import Features

#: top-level children that belong to the classifier, not the trunk
HEAD_NAMES = frozenset({"fc", "classifier", "head", "heads", "avgpool", "dropout", "flatten", "norm",
                        "permute"})
#: builder defaults that make ``forward`` return a plain logits tensor
PLAIN_LOGITS = {"googlenet": {"aux_logits": False, "init_weights": True},
                "inception_v3": {"aux_logits": False, "init_weights": True}}


#: torchvision's classification models (``torchvision.models.list_models(module=torchvision.models)``
#: of torchvision 0.29), written out so that registering ``tv.NAME`` does not import torchvision
#: (over a second); a name the installed torchvision lacks fails when it is built
CLASSIFIERS = (
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny", "densenet121",
    "densenet161", "densenet169", "densenet201", "efficientnet_b0", "efficientnet_b1",
    "efficientnet_b2", "efficientnet_b3", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6",
    "efficientnet_b7", "efficientnet_v2_l", "efficientnet_v2_m", "efficientnet_v2_s", "googlenet",
    "inception_v3", "maxvit_t", "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3",
    "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_16gf", "regnet_x_1_6gf",
    "regnet_x_32gf", "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf", "regnet_x_8gf",
    "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf",
    "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf", "resnet101", "resnet152", "resnet18",
    "resnet34", "resnet50", "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "squeezenet1_0", "squeezenet1_1", "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s",
    "swin_v2_t", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32", "wide_resnet101_2",
    "wide_resnet50_2",
)


def trunk_modules(net: nn.Module, name: str) -> list[nn.Module]:
    """The modules whose outputs are candidate stage maps, see the module docstring."""
    if name.startswith("vit_"):
        return list(net.encoder.layers)
    out: list[nn.Module] = []
    for child_name, child in net.named_children():
        if child_name in HEAD_NAMES:
            continue
        out += list(child) if isinstance(child, (nn.Sequential, nn.ModuleList)) else [child]
    return out


def last_per_resolution(maps: list[Tensor]) -> list[Tensor]:
    """Keep the last ``[B, C, H, W]`` map of every run of equal ``(H, W)``."""
    kept: list[Tensor] = []
    for m in maps:
        if m.dim() != 4:
            continue
        if kept and kept[-1].shape[-2:] == m.shape[-2:]:
            kept[-1] = m
        else:
            kept.append(m)
    return kept


class TorchvisionBackbone(nn.Module):
    """``tv.NAME``: a torchvision classifier with the kdcore-vision feature interface
    (``model(x)`` -> logits, ``model(x, return_features=True)`` -> ``(logits, Features)``)."""

    def __init__(self, name: str, num_classes: int = 1000, **options: Any):
        super().__init__()
        from torchvision import models

        self.name = name
        self.net = models.get_model(name, weights=None, num_classes=num_classes,
                                    **{**PLAIN_LOGITS.get(name, {}), **options})
        self._recording: dict[str, Any] | None = None
        self._nhwc = name.startswith("swin")
        for m in trunk_modules(self.net, name):
            m.register_forward_hook(self._record_stage)
        linears = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
        if linears:
            linears[-1].register_forward_pre_hook(self._record_pooled)

    def _record_stage(self, module: nn.Module, args: Any, output: Tensor) -> None:
        if self._recording is not None:
            self._recording["stages"].append(output.permute(0, 3, 1, 2) if self._nhwc else output)

    def _record_pooled(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if self._recording is not None:
            self._recording["pooled"] = args[0]

    def forward_features(self, x: Tensor) -> Features:
        return self(x, return_features=True)[1]

    def forward(self, x: Tensor, return_features: bool = False):
        if not return_features:
            return self.net(x)
        self._recording = {"stages": [], "pooled": None}
        try:
            logits = self.net(x)
            rec = self._recording
        finally:
            self._recording = None
        maps = rec["stages"] if self.name.startswith("vit_") else last_per_resolution(rec["stages"])
        pooled = rec["pooled"]
        if pooled is None:
            pooled = F.adaptive_avg_pool2d(maps[-1], 1).flatten(1)
        return logits, Features(maps, pooled)


def torchvision_factory(name: str) -> Callable[..., TorchvisionBackbone]:
    """The registered factory of ``tv.{name}``."""

    def build(num_classes: int = 1000, weights: None = None, **options: Any) -> TorchvisionBackbone:
        if weights is not None:
            raise ConfigError(f"weights: tv.{name} is built untrained (weights must be None); pretrained "
                              "weights would be downloaded -- load a checkpoint into backbone.net instead")
        return TorchvisionBackbone(name, num_classes=num_classes, **options)

    build.__name__ = build.__qualname__ = f"tv_{name}"
    build.__doc__ = f"torchvision.models.{name}(weights=None, num_classes=...) with kdcore-vision features."
    return build
