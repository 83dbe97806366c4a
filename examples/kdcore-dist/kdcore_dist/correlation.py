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
    (un, flat_u), (vn, flat_v) = _centred_unit(u, dim), _centred_unit(v, dim)
    rho = (un * vn).sum(dim)
    same = (u == v).all(dim).to(rho.dtype)
    return torch.where(flat_u | flat_v, same, rho)


def _centred_unit(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``(x - mean x) / ||x - mean x||`` along ``dim``, and where ``x`` is constant.

    Scaled by its largest entry first (the correlation does not change), so
    that the squared norm is at least 1: tiny probabilities (1e-25) neither
    underflow in the value nor overflow in the gradient. Constant slices are
    divided by 1 instead of 0, so no 0 / 0 appears even in the branch the
    caller discards (its gradient would be NaN, and NaN times 0 is NaN).
    """
    d = x - x.mean(dim, keepdim=True)
    scale = d.abs().amax(dim, keepdim=True)
    flat = scale == 0
    one = torch.ones_like(scale)
    d = d / torch.where(flat, one, scale)
    norm = torch.where(flat, one, (d * d).sum(dim, keepdim=True)).sqrt()
    return d / norm, flat.squeeze(dim)


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
