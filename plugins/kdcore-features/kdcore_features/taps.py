"""Default feature taps: which modules of a backbone the feature losses read.

:func:`default_taps` returns a :class:`Taps` for a model, from (in this order)

1. the model's own ``feature_taps`` attribute (a :class:`Taps`, or a mapping with
   ``stages`` and ``pooled``): any model can declare its taps this way;
2. the CIFAR zoo of kdcore-vision, by class (paths below);
3. torchvision classifiers, wrapped as ``tv.*`` (paths under ``net.``) or bare:
   ResNet-like models (``layer1`` ... ``layer4``) by name; other convolutional
   ``tv.*`` models by one probing forward pass (eval mode, no grad, a
   ``2 x 3 x 64 x 64`` zero input) over the trunk modules kdcore-vision records
   as stages, keeping the last module of each spatial resolution;

and raises :class:`kdcore.ConfigError` for anything else (name the modules with
``student_layers`` / ``teacher_layers``).

``Taps.stages`` are the resolution stages after the stem, shallow to deep;
``Taps.pooled`` is the module whose output, averaged over space, is the vector
the classifier reads (the "penultimate" or "pooled" feature of CRD, RKD, PKT).

| family (class) | ``stages`` | ``pooled`` |
| --- | --- | --- |
| CIFAR ResNets, resnet8x4/32x4, resnet18/34/50 (``ResNet``) | ``stages.0`` ... ``stages.{n-1}`` | last stage |
| WRNs (``WideResNet``) | ``stages.0``, ``stages.1``, ``stages.2`` | ``post`` (final BN-ReLU) |
| VGGs (``VGG``) | ``blocks.1`` ... ``blocks.4`` | ``blocks.4`` |
| MobileNetV2 | ``groups.1``, ``groups.2``, ``groups.4``, ``groups.6`` | ``head`` (1x1 conv to 1280) |
| ShuffleNetV1 | ``stages.0``, ``stages.1``, ``stages.2`` | ``stages.2`` |
| ShuffleNetV2 | ``stages.0``, ``stages.1``, ``stages.2`` | ``head`` (1x1 conv to 1024) |
| ``tv.resnet*``, ``tv.resnext*``, ``tv.wide_resnet*`` | ``net.layer1`` ... ``net.layer4`` | ``net.layer4`` |
| other convolutional ``tv.*`` | last trunk module of each resolution after the first | last of them |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from kdcore.common.errors import ConfigError


class Taps(NamedTuple):
    """A model's default taps: stage modules (after the stem, shallow to deep) and the pooled one."""

    stages: list[str]
    pooled: str


def _zoo_taps(model: nn.Module) -> Taps | None:
    cls = type(model).__name__
    if not type(model).__module__.startswith("kdcore_vision"):
        return None
    names = {n for n, _ in model.named_modules()}
    if cls in ("ResNet", "ShuffleNetV1", "ShuffleNetV2", "WideResNet"):
        stages = [f"stages.{i}" for i in range(len(model.stages))]
        pooled = {"WideResNet": "post", "ShuffleNetV2": "head"}.get(cls, stages[-1])
        return Taps(stages, pooled)
    if cls == "VGG":
        stages = [f"blocks.{i}" for i in range(1, len(model.blocks))]
        return Taps(stages, stages[-1])
    if cls == "MobileNetV2":
        from kdcore_vision.mobilenetv2 import STAGE_ENDS

        stages = [f"groups.{i}" for i in STAGE_ENDS if f"groups.{i}" in names]
        return Taps(stages, "head")
    return None


def _resnet_like(model: nn.Module, prefix: str) -> Taps | None:
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)) and hasattr(model, "fc"):
        stages = [f"{prefix}layer{i}" for i in range(1, 5)]
        return Taps(stages, stages[-1])
    return None


@torch.no_grad()
def _probe_torchvision(backbone: nn.Module) -> Taps | None:
    """The last trunk module of each spatial resolution of a ``tv.*`` model (one forward pass)."""
    from kdcore_vision.torchvision_models import trunk_modules

    name = getattr(backbone, "name", "")
    if name.startswith(("vit_", "swin", "maxvit")):
        return None
    net = backbone.net
    paths = {id(m): f"net.{p}" for p, m in net.named_modules() if p}
    seen: list[tuple[str, tuple[int, ...]]] = []
    handles = [m.register_forward_hook(lambda mod, a, out, p=paths.get(id(m)): seen.append(
        (p, tuple(out.shape) if isinstance(out, torch.Tensor) else ())))
        for m in trunk_modules(net, name) if id(m) in paths]
    param = next(net.parameters())
    was = net.training
    net.eval()
    try:
        net(torch.zeros(2, 3, 64, 64, device=param.device, dtype=param.dtype))
    except Exception:  # noqa: BLE001 - a model that cannot run at 64 px gets no default
        return None
    finally:
        net.train(was)
        for h in handles:
            h.remove()
    kept: list[tuple[str, tuple[int, ...]]] = []
    for path, shape in seen:
        if len(shape) != 4:
            continue
        if kept and kept[-1][1][-2:] == shape[-2:]:
            kept[-1] = (path, shape)
        else:
            kept.append((path, shape))
    stages = [p for p, _ in kept[1:]]  # the first resolution is the stem
    if not stages:
        return None
    return Taps(stages, stages[-1])


def default_taps(model: nn.Module) -> Taps:
    """The default :class:`Taps` of ``model`` (see the module docstring), or a ConfigError."""
    own = getattr(model, "feature_taps", None)
    if own is not None:
        if isinstance(own, Taps):
            return own
        if isinstance(own, Mapping):
            return Taps(list(own["stages"]), str(own["pooled"]))
        raise ConfigError(f"{type(model).__name__}.feature_taps: must be a Taps or a mapping with "
                          f"'stages' and 'pooled', got {own!r}")
    taps = _zoo_taps(model)
    if taps is None and type(model).__name__ == "TorchvisionBackbone":
        taps = _resnet_like(model.net, "net.") or _probe_torchvision(model)
    if taps is None:
        taps = _resnet_like(model, "")
    if taps is None:
        raise ConfigError(f"no default feature taps for a {type(model).__name__}: name its modules with "
                          "student_layers / teacher_layers (paths from model.named_modules())")
    return taps
