"""The ``dkd`` loss: Decoupled Knowledge Distillation (Zhao et al. 2022).

``L = T^2 * (alpha * TCKD + beta * NCKD)`` with ``TCKD = D(b^t || b^s)`` and
``NCKD = D(rho^t || rho^s)`` on temperature-softened distributions (TAND paper
eq. 3-5; with D = KL, ``KL(p || q) = TCKD + (1 - p_t) * NCKD``, thm 2.1).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from kdcore.common import params
from kdcore.losses import LogitLoss, Spec
from kdcore.losses.divergences import is_kl
from kdcore.losses.functional import split_target, target_split_terms
from kdcore_dkd.decoupled import decoupled_rows, part_divergences


class DKD(LogitLoss):
    """``dkd``: ``T^2 * (alpha * TCKD + beta * NCKD)`` (TAND paper eq. 3-5).

    Defaults are the DKD paper's CIFAR-100 setting: ``alpha=1``, ``beta=8``,
    ``temperature=4``. ``divergence=`` replaces KL in both parts;
    ``tckd_divergence=`` / ``nckd_divergence=`` replace it in one part and take
    precedence over ``divergence=``. The paper's warm-up is the
    ``warmup`` schedule (built in), not part of the loss.
    """

    uses_target = True

    def __init__(self, *, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 divergence: Spec | None = None, tckd_divergence: Spec | None = None,
                 nckd_divergence: Spec | None = None, transforms: Sequence[Spec] | None = None,
                 chunk_size: int | None = None):
        super().__init__(temperature=temperature, transforms=transforms, chunk_size=chunk_size)
        self.alpha = params.non_negative("alpha", alpha)
        self.beta = params.non_negative("beta", beta)
        self.tckd_divergence, self.nckd_divergence = part_divergences(
            divergence, tckd_divergence, nckd_divergence)

    def rows(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        t = self.temperature
        if is_kl(self.tckd_divergence) and is_kl(self.nckd_divergence):  # fused forward and backward
            split = target_split_terms(student, teacher, target, t)
            return t * t * (self.alpha * split.tckd + self.beta * split.nckd)
        parts_t = split_target(teacher, target, t)
        parts_s = split_target(student, target, t)
        return t * t * decoupled_rows(parts_t, parts_s, self.tckd_divergence, self.nckd_divergence,
                                      self.alpha, self.beta)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha:g}, beta={self.beta:g}, temperature={self.temperature:g}, "
                f"tckd_divergence={self.tckd_divergence!r}, nckd_divergence={self.nckd_divergence!r}")
