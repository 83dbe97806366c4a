"""Tiny models for the checks that need a network (feature losses, weightings)."""

from __future__ import annotations

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """A four-layer convolutional classifier on ``[N, in_channels, H, W]`` images.

    Its stages are ``stages.0`` (``width`` channels, full size), ``stages.1``
    (``2 * width``, half size) and ``stages.2`` (``4 * width``, quarter size),
    declared in ``feature_taps`` (``stages`` and ``pooled``), the attribute
    feature losses read their default taps from.
    """

    def __init__(self, num_classes: int = 5, width: int = 4, in_channels: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.stages = nn.Sequential(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU()),
        )
        self.fc = nn.Linear(4 * width, num_classes)
        self.feature_taps = {"stages": ["stages.0", "stages.1", "stages.2"], "pooled": "stages.2"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))
