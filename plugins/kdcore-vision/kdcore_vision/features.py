"""The feature interface shared by every kdcore-vision backbone.

Every backbone is called as

* ``model(x)`` -> logits ``[B, num_classes]`` (what the kdcore engine uses), or
* ``model(x, return_features=True)`` -> ``(logits, Features)``,

and ``model.forward_features(x)`` returns the :class:`Features` alone.
``Features.stages`` lists feature maps from shallow to deep: ``stages[0]`` is
the stem output, every later entry the output of one resolution stage
(``[B, C_i, H_i, W_i]``); ``Features.pooled`` is the ``[B, D]`` vector the
final linear classifier reads (the "penultimate feature" of CRD, RKD, ...).
``Features`` is a NamedTuple, hence a pytree: it passes through
``torch.compile`` and ``DataParallel`` like a tuple.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class Features(NamedTuple):
    """Intermediate outputs of a backbone: stage maps (shallow to deep) and the pooled vector."""

    stages: list[Tensor]
    pooled: Tensor


class Backbone(nn.Module):
    """Base of the CIFAR backbones: a trunk giving :class:`Features` and a linear head ``fc``.

    Subclasses implement :meth:`forward_features` and set ``self.fc``.
    """

    fc: nn.Linear

    def forward_features(self, x: Tensor) -> Features:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor, return_features: bool = False):
        feats = self.forward_features(x)
        logits = self.fc(feats.pooled)
        return (logits, feats) if return_features else logits


def init_conv_bn(model: nn.Module) -> None:
    """He (fan-out) normal init of every conv, BN scale 1 and shift 0 (the zoo's common init)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def feature_shapes(model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32)
                   ) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    """Per-sample shapes of ``model``'s stage maps and pooled vector for one input shape.

    Runs one batch-of-2 forward in eval mode (restoring the previous mode) on
    the model's device; useful to size the adapters of feature-based losses.
    """
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros((2, *input_shape), device=param.device, dtype=param.dtype)
        _, feats = model(x, return_features=True)
    finally:
        model.train(was_training)
    return [tuple(s.shape[1:]) for s in feats.stages], tuple(feats.pooled.shape[1:])
