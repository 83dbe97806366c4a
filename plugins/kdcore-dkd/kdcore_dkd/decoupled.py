"""The target-aware decomposition shared by DKD and TAND (TAND paper eq. 3-5, 8).

``TCKD = D_t(b^t || b^s)`` on the binary target-vs-rest distributions
``b = [p_t, 1 - p_t]`` and ``NCKD = D_n(rho^t || rho^s)`` on the non-target
distributions renormalised over the classes ``!= t``. :func:`decoupled_rows`
takes the pieces returned by :func:`kdcore.losses.functional.split_target`, so a loss
that needs the decomposition for more than one term (TAND) computes it once.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kdcore.losses import Spec, resolve_divergence

#: ``(log_b [n, 2], log_rho [n, C])`` as returned by ``split_target``
Split = tuple[Tensor, Tensor]


def part_divergences(divergence: Spec | None = None, tckd_divergence: Spec | None = None,
                     nckd_divergence: Spec | None = None) -> tuple[Any, Any]:
    """The ``(TCKD, NCKD)`` divergences: ``divergence`` sets both (default KL);
    ``tckd_divergence`` / ``nckd_divergence`` override it for one part. Each is
    a registered name, a ``{"name": ..., **params}`` mapping or an object."""
    shared = resolve_divergence(divergence, "divergence")
    tckd = shared if tckd_divergence is None else resolve_divergence(tckd_divergence, "tckd_divergence")
    nckd = shared if nckd_divergence is None else resolve_divergence(nckd_divergence, "nckd_divergence")
    return tckd, nckd


def decoupled_rows(teacher: Split, student: Split, tckd_divergence: Any, nckd_divergence: Any,
                   alpha: float, beta: float) -> Tensor:
    """Per-row ``alpha * TCKD + beta * NCKD`` from the teacher's and the
    student's ``split_target`` pieces (DKD without its ``T^2``; TAND paper eq. 8)."""
    (t_b, t_rho), (s_b, s_rho) = teacher, student
    return alpha * tckd_divergence(t_b, s_b) + beta * nckd_divergence(t_rho, s_rho)
