"""The ``tand`` loss: Target-Aware Normalized Distillation (TAND paper eq. 9).

``L_TAND = L_NKD + L_TAD`` with, at temperature T (methods.md conventions),
``L_NKD = -p_t log q_t + gamma * T^2 * CE(rho^t, rho^s)`` (eq. 7, target term
at T = 1) and ``L_TAD = T^2 * (alpha * TCKD + beta * NCKD)`` (eq. 8, DKD's
form). The target/non-target decomposition is computed once and shared by the
NKD terms (kdcore-nkd) and the TAD terms (kdcore-dkd).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from kdcore.common import params
from kdcore.losses import LogitLoss, Spec, resolve_divergence
from kdcore.losses.divergences import is_kl
from kdcore.losses.functional import split_target, target_split_terms
from kdcore_dkd import decoupled_rows, part_divergences
from kdcore_nkd import nkd_rows, split_nkd_rows


class TAND(LogitLoss):
    """``tand``: ``nkd(gamma, T) + T^2 * (alpha * TCKD + beta * NCKD)`` (TAND paper eq. 9).

    Defaults ``alpha=1``, ``beta=2``, ``gamma=1.5``, ``temperature=1`` (the
    paper's DS-NER setting; its vision setting is alpha=2, beta=0.5, gamma=0.5
    after 50 epochs of plain KD, see docs/methods/tand.md).

    ``divergence=`` replaces KL in every distribution-matching part: TCKD, NCKD
    and NKD's normalised non-target term (whose default cross entropy is KL up
    to a teacher-only constant). ``tckd_divergence=``, ``nckd_divergence=`` and
    ``nkd_divergence=`` override it for one part.
    """

    uses_target = True

    def __init__(self, *, alpha: float = 1.0, beta: float = 2.0, gamma: float = 1.5,
                 temperature: float = 1.0, divergence: Spec | None = None,
                 tckd_divergence: Spec | None = None, nckd_divergence: Spec | None = None,
                 nkd_divergence: Spec | None = None, transforms: Sequence[Spec] | None = None,
                 chunk_size: int | None = None):
        super().__init__(temperature=temperature, transforms=transforms, chunk_size=chunk_size)
        self.alpha = params.non_negative("alpha", alpha)
        self.beta = params.non_negative("beta", beta)
        self.gamma = params.non_negative("gamma", gamma)
        shared = None if divergence is None else resolve_divergence(divergence, "divergence")
        self.tckd_divergence, self.nckd_divergence = part_divergences(shared, tckd_divergence, nckd_divergence)
        self.nkd_divergence = shared if nkd_divergence is None else resolve_divergence(
            nkd_divergence, "nkd_divergence")

    def rows(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        t = self.temperature
        if is_kl(self.tckd_divergence) and is_kl(self.nckd_divergence) and (
                self.nkd_divergence is None or is_kl(self.nkd_divergence)):
            return self._fused_rows(student, teacher, target)
        split_t = split_target(teacher, target, t)
        split_s = split_target(student, target, t)
        nkd = nkd_rows(teacher, student, target, split_t, split_s, t, self.gamma, self.nkd_divergence)
        tad = decoupled_rows(split_t, split_s, self.tckd_divergence, self.nckd_divergence,
                             self.alpha, self.beta)
        return nkd + (t * t) * tad

    def _fused_rows(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        """Every part from one :func:`kdcore.losses.functional.target_split_terms` (fused forward and backward)."""
        t = self.temperature
        split = target_split_terms(student, teacher, target, t, entropy=self.nkd_divergence is None)
        nkd = split_nkd_rows(teacher, student, target, split, t, self.gamma)
        return nkd + (t * t) * (self.alpha * split.tckd + self.beta * split.nckd)

    def extra_repr(self) -> str:
        nkd = "cross_entropy" if self.nkd_divergence is None else repr(self.nkd_divergence)
        return (f"alpha={self.alpha:g}, beta={self.beta:g}, gamma={self.gamma:g}, "
                f"temperature={self.temperature:g}, tckd_divergence={self.tckd_divergence!r}, "
                f"nckd_divergence={self.nckd_divergence!r}, nkd_divergence={nkd}")
