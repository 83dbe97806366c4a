"""The ``nkd`` loss: Normalized Knowledge Distillation (Yang et al. 2023;
TAND paper eq. 7, related-abstracts NKD) with the temperature convention of
methods.md: ``L = -p_t log q_t + gamma * T^2 * CE(rho^t(T), rho^s(T))``, the
target term at T = 1 and without ``gamma``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from kdcore.common import params
from kdcore.losses import LogitLoss, Spec, resolve_divergence
from kdcore.losses.divergences import is_kl
from kdcore.losses.functional import split_target, target_split_terms
from kdcore_nkd.terms import nkd_rows, split_nkd_rows


class NKD(LogitLoss):
    """``nkd``: ``-p_t log q_t + gamma * T^2 * CE(rho^t(T), rho^s(T))`` (TAND paper eq. 7).

    Defaults ``gamma=1.5``, ``temperature=1`` (the TAND paper's setting).
    ``divergence=`` (name, ``{"name": ..}`` mapping or object) replaces the
    non-target cross entropy by ``D(rho^t || rho^s)``; ``kl`` gives the same
    student gradients as the default (the values differ by the teacher's
    non-target entropy). The target term is not a divergence between two
    distributions and stays ``-p_t log q_t``.
    """

    uses_target = True

    def __init__(self, *, gamma: float = 1.5, temperature: float = 1.0, divergence: Spec | None = None,
                 transforms: Sequence[Spec] | None = None, chunk_size: int | None = None):
        super().__init__(temperature=temperature, transforms=transforms, chunk_size=chunk_size)
        self.gamma = params.non_negative("gamma", gamma)
        self.divergence = None if divergence is None else resolve_divergence(divergence, "divergence")

    def rows(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        t = self.temperature
        if self.divergence is None or is_kl(self.divergence):  # fused forward and backward
            split = target_split_terms(student, teacher, target, t, entropy=self.divergence is None)
            return split_nkd_rows(teacher, student, target, split, t, self.gamma)
        split_t = split_target(teacher, target, t)
        split_s = split_target(student, target, t)
        return nkd_rows(teacher, student, target, split_t, split_s, t, self.gamma, self.divergence)

    def extra_repr(self) -> str:
        div = "cross_entropy" if self.divergence is None else repr(self.divergence)
        return f"gamma={self.gamma:g}, temperature={self.temperature:g}, divergence={div}"
