"""Built-in loss terms: ``ce``, ``kd`` (Hinton et al. 2015) and ``rkd`` (reverse KL)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcore.common import params
from kdcore.losses import LogitLoss, Spec, resolve_divergence
from kdcore.losses.divergences import KL
from kdcore.losses.functional import IGNORE_INDEX, kd_rows, log_softmax_t, scaled_logits, upcast


class CrossEntropy(LogitLoss):
    """``ce``: cross entropy with the labels (no temperature); ``label_smoothing``
    mixes the one-hot target with the uniform distribution (Szegedy et al. 2016).
    ``transforms``: student-side transforms (or both-side ones, which act on the
    student here) applied to the student before the cross entropy; none by default,
    so a ``ce`` term beside a kd term with ``logit_std`` stays on the raw logits."""

    uses_teacher = False
    uses_target = True

    def __init__(self, *, label_smoothing: float = 0.0, transforms: Sequence[Spec] | None = None,
                 chunk_size: int | None = None):
        super().__init__(transforms=transforms, chunk_size=chunk_size)
        self.label_smoothing = params.in_range("label_smoothing", label_smoothing, 0.0, 1.0)

    def kept_sum(self, student: Tensor, teacher: Tensor | None, target: Tensor) -> Tensor:
        if self.label_smoothing or self.transforms:
            return super().kept_sum(student, teacher, target)
        return F.cross_entropy(upcast(student), target, ignore_index=IGNORE_INDEX, reduction="sum")

    def rows(self, student: Tensor, teacher: Tensor | None, target: Tensor) -> Tensor:
        if not self.label_smoothing:
            return F.cross_entropy(student, target, reduction="none")
        # -inf columns are padding, not classes: the uniform part covers real columns only
        logq = torch.log_softmax(student, dim=-1)
        nll = -logq.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        real = student > float("-inf")
        uniform = -logq.masked_fill(~real, 0.0).sum(-1) / real.sum(-1).clamp(min=1)
        return (1 - self.label_smoothing) * nll + self.label_smoothing * uniform

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing:g}"


class KD(LogitLoss):
    """``kd``: Hinton et al. (2015), ``T^2 * D(p^T || q^T)`` with D = KL by default.

    ``divergence=`` takes any registered divergence (name, ``{"name": ..}``
    table or object), e.g. ``{"name": "ab", "alpha": 0.8, "beta": 0.3}``.
    """

    def __init__(self, *, temperature: float = 4.0, divergence: Spec | None = None,
                 transforms: Sequence[Spec] | None = None, chunk_size: int | None = None):
        super().__init__(temperature=temperature, transforms=transforms, chunk_size=chunk_size)
        self.divergence = resolve_divergence(divergence)

    def rows(self, student: Tensor, teacher: Tensor, target: Tensor | None) -> Tensor:
        t = self.temperature
        if type(self.divergence) is KL:
            return kd_rows(student, teacher, t)  # fused forward and backward
        from_logits = getattr(self.divergence, "from_logits", None)
        if from_logits is not None:  # a divergence with its own path from the logits
            return t * t * from_logits(scaled_logits(teacher, t), scaled_logits(student, t))
        return t * t * self.divergence(log_softmax_t(teacher, t), log_softmax_t(student, t))

    def lean_kd_temperature(self) -> float | None:
        cls = type(self)
        plain = (cls.rows is KD.rows and cls.kept_sum is LogitLoss.kept_sum
                 and cls.sides is LogitLoss.sides)
        return self.temperature if plain and type(self.divergence) is KL and not self.transforms else None


class ReverseKD(LogitLoss):
    """``rkd``: reverse KL ``T^2 * KL(q^T || p^T)`` (mode-seeking)."""

    def __init__(self, *, temperature: float = 1.0, transforms: Sequence[Spec] | None = None,
                 chunk_size: int | None = None):
        super().__init__(temperature=temperature, transforms=transforms, chunk_size=chunk_size)

    def rows(self, student: Tensor, teacher: Tensor, target: Tensor | None) -> Tensor:
        return kd_rows(student, teacher, self.temperature, reverse=True)  # fused forward and backward
