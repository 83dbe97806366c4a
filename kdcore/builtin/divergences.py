"""Built-in divergences ``div(teacher_logp, student_logp) -> per-row values``."""

from __future__ import annotations

from torch import Tensor

from kdcore.functional import kl_rows


class KL:
    """``kl``: forward KL, ``KL(p || q) = sum_k p_k log(p_k / q_k)`` (mean-seeking)."""

    def __call__(self, teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
        return kl_rows(teacher_logp, student_logp)

    def __repr__(self) -> str:
        return "KL()"


class ReverseKL:
    """``rkl``: reverse KL, ``KL(q || p)`` (mode-seeking)."""

    def __call__(self, teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
        return kl_rows(student_logp, teacher_logp)

    def __repr__(self) -> str:
        return "ReverseKL()"
