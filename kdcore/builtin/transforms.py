"""Built-in soft-label transforms (teacher side, log-probabilities in and out)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdcore.common import params


class Temperature:
    """``temperature``: ``log_softmax(log p / T)``, a teacher-only temperature."""

    def __init__(self, temperature: float = 2.0):
        self.temperature = params.positive("temperature", temperature)

    def __call__(self, teacher_logp: Tensor, target: Tensor | None = None) -> Tensor:
        return torch.log_softmax(teacher_logp / self.temperature, dim=-1)

    def __repr__(self) -> str:
        return f"Temperature(temperature={self.temperature:g})"


class LabelSmoothing:
    """``label_smoothing``: ``log((1 - delta) p + delta / C)``, computed as a
    log-sum-exp so that it is exact for probabilities that underflow.

    Columns whose teacher log-probability is ``-inf`` are padding (e.g. a
    padded vocabulary), not classes: C counts the real columns only and the
    padded ones stay at probability 0."""

    def __init__(self, delta: float = 0.1):
        self.delta = params.in_range("delta", delta, 0.0, 1.0)

    def __call__(self, teacher_logp: Tensor, target: Tensor | None = None) -> Tensor:
        if self.delta == 0.0:
            return teacher_logp
        real = teacher_logp > float("-inf")
        log_c = real.sum(-1, keepdim=True).clamp(min=1).to(teacher_logp.dtype).log()
        smoothed = torch.logaddexp(teacher_logp + math.log1p(-self.delta), math.log(self.delta) - log_c)
        return torch.where(real, smoothed, teacher_logp)

    def __repr__(self) -> str:
        return f"LabelSmoothing(delta={self.delta:g})"
