"""The two divergences of the core, ``div(teacher_logp, student_logp) -> per-row values``:
forward and reverse KL (registered as ``kl`` and ``rkl`` by the built-in plugin), and
:func:`is_kl`, which losses ask before taking the closed form of the forward KL."""

from __future__ import annotations

from torch import Tensor

from kdcore.losses.functional import kl_rows


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


def is_kl(divergence: object) -> bool:
    """Whether ``divergence`` is the built-in ``kl``: a loss may then use
    :func:`~kdcore.losses.functional.target_split_terms` instead of the general decomposition."""
    return type(divergence) is KL
