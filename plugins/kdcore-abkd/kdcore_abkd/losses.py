"""The ``abkd`` and ``abdkd`` losses (ABKD paper eq. 7 and its ABDKD variant)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from kdcore.common import params
from kdcore.losses import LogitLoss, Spec
from kdcore.losses.functional import decoupled_terms, kl_rows, log_softmax_t
from kdcore_abkd.divergence import AlphaBetaDivergence, exponent


class ABKD(LogitLoss):
    """``abkd``: ``T^2 * D_AB^(alpha, beta)(p^T || q^T)``, the distillation term of
    ABKD paper eq. 7 (def. 4.1, continuous extension eq. 8) on temperature-softened
    distributions (methods.md: ``T^2`` as for every method, so ``T = 1`` is eq. 7).

    Defaults are the paper's CIFAR-100 setting: ``alpha=0.8``, ``beta=0.3``
    (Table 4, e.g. resnet56 -> resnet20; Table 11 uses it for every teacher) with
    the authors' ``T = 4``. Their weight ``lambda = 32`` applied without ``T^2`` is
    ``weight = 32 / T^2 = 2`` here. The instruction-following setting (App. I.1) is
    ``alpha=0.2``, ``beta=0.7``, ``temperature=1``, no CE term.
    """

    def __init__(self, *, alpha: float = 0.8, beta: float = 0.3, temperature: float = 4.0,
                 transforms: Sequence[Spec] | None = None, chunk_size: int | None = None):
        super().__init__(temperature=temperature, transforms=transforms, chunk_size=chunk_size)
        self.divergence = AlphaBetaDivergence(alpha=alpha, beta=beta)

    def rows(self, student: Tensor, teacher: Tensor, target: Tensor | None) -> Tensor:
        t = self.temperature
        return t * t * self.divergence(log_softmax_t(teacher, t), log_softmax_t(student, t))

    def extra_repr(self) -> str:
        return (f"alpha={self.divergence.alpha:g}, beta={self.divergence.beta:g}, "
                f"temperature={self.temperature:g}")


class ABDKD(LogitLoss):
    """``abdkd``: Decoupled KD with the alpha-beta divergence on the non-target part,
    ``T^2 * (alpha * KL(b^t || b^s) + beta * D_AB^(ab_alpha, ab_beta)(rho^t || rho^s))``
    (ABKD paper Tables 4 and 12, "ABDKD"; the authors' code keeps KL on TCKD).

    ``alpha``, ``beta``, ``temperature`` are DKD's (defaults 1, 8, 4);
    ``ab_alpha``, ``ab_beta`` the divergence's (default 0.8, 0.3, the most common
    ABDKD entry of Table 4). DKD's warm-up is a schedule, not part of the loss.
    """

    uses_target = True

    def __init__(self, *, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 ab_alpha: float = 0.8, ab_beta: float = 0.3,
                 transforms: Sequence[Spec] | None = None, chunk_size: int | None = None):
        super().__init__(temperature=temperature, transforms=transforms, chunk_size=chunk_size)
        self.alpha = params.non_negative("alpha", alpha)
        self.beta = params.non_negative("beta", beta)
        self.nckd_divergence = AlphaBetaDivergence(alpha=exponent("ab_alpha", ab_alpha),
                                                   beta=exponent("ab_beta", ab_beta))

    def rows(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        t = self.temperature
        tckd, nckd = decoupled_terms(teacher, student, target, kl_rows, self.nckd_divergence, t)
        return t * t * (self.alpha * tckd + self.beta * nckd)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha:g}, beta={self.beta:g}, temperature={self.temperature:g}, "
                f"ab_alpha={self.nckd_divergence.alpha:g}, ab_beta={self.nckd_divergence.beta:g}")
