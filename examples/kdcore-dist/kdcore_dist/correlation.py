"""The Pearson correlation coefficient and the distance DIST builds on it.

Huang et al. 2022, sec. 3: ``d_p(u, v) = 1 - rho_p(u, v)`` with
``rho_p(u, v) = sum_i (u_i - mean u)(v_i - mean v) / (||u - mean u|| ||v - mean v||)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pearson(u: Tensor, v: Tensor, dim: int = -1) -> Tensor:
    """``rho_p(u, v)`` along ``dim`` (that dim reduced).

    Where ``u`` or ``v`` is constant along ``dim`` the coefficient is undefined;
    it is taken as 1 where the two are equal and 0 otherwise, so that
    ``1 - pearson(p, p) = 0`` for every ``p``, with zero gradient there.
    """
    du, dv = u - u.mean(dim, keepdim=True), v - v.mean(dim, keepdim=True)
    ss_u, ss_v = (du * du).sum(dim), (dv * dv).sum(dim)
    flat = (ss_u == 0) | (ss_v == 0)
    one = torch.ones_like(ss_u)
    rho = (du * dv).sum(dim) / torch.where(flat, one, ss_u).sqrt() / torch.where(flat, one, ss_v).sqrt()
    same = (u == v).all(dim).to(rho.dtype)
    return torch.where(flat, same, rho)


class PearsonDistance:
    """Divergence ``pearson``: ``div(teacher_logp, student_logp) = 1 - rho_p(p_t, p_s)``
    per row, the probabilities correlated across the classes (DIST's
    inter-class relation of one sample, Huang et al. 2022, sec. 3.3).

    Symmetric, in ``[0, 2]``, 0 between identical distributions, and also
    between distributions that differ but correlate perfectly
    (``p_s = a p_t + b`` with ``a > 0``).
    Classes where both distributions are 0 (``-inf`` log-probabilities) are
    kept: they take part in the means.
    """

    def __call__(self, teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
        return 1.0 - pearson(teacher_logp.exp(), student_logp.exp(), dim=-1)

    def __repr__(self) -> str:
        return "PearsonDistance()"
