"""The mathematics of PTLoss (Zhang et al., "Do Not Blindly Imitate the
Teacher: Using Perturbed Loss for Knowledge Distillation"; PTLoss paper eq. 7).

``l_PT(p, q) = KL(p || q) + sum_c p_c P_c(1 - q_c)`` with the perturbation
polynomial ``P_c(r) = sum_{m=1..M} eps_{c,m} r^m``.

``1 - q_c`` is taken from log space (:func:`log1m_softmax`), exact also where
it underflows or where ``q_c`` rounds to 1, and finite in value and gradient
for ``-inf`` logits (padded columns).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from kdcore.losses.functional import kl_rows


def log1m_softmax(logp: Tensor) -> Tensor:
    """``log(1 - q_c)`` for every class of normalised log-probabilities ``logp``.

    For every class but the most probable one ``q_c <= 1/2`` and
    ``log1p(-exp(log q_c))`` is exact; for the most probable class
    ``1 - q_c = sum_{k != c} q_k`` is a log-sum-exp of the other classes
    (no cancellation when ``q_c`` is close to 1). A row with a single finite
    class gives ``-inf`` there, with a zero (not NaN) gradient.
    """
    top = logp.argmax(dim=-1, keepdim=True)
    others = logp.scatter(-1, top, float("-inf"))
    peak = others.amax(dim=-1, keepdim=True).detach()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(others - peak).sum(dim=-1, keepdim=True)
    nonzero = total > 0
    log_rest = torch.where(nonzero, torch.log(torch.where(nonzero, total, torch.ones_like(total))) + peak,
                           torch.full_like(total, float("-inf")))
    # the top class gets a placeholder before log1p (its value is replaced below)
    small = logp.scatter(-1, top, -math.log(2.0))
    return torch.log1p(-torch.exp(small)).scatter(-1, top, log_rest)


def horner(coeffs: Sequence[Tensor], x: Tensor) -> Tensor:
    """``sum_k coeffs[k] * x^k``; each coefficient broadcasts against ``x``."""
    if not coeffs:
        return torch.zeros_like(x)
    acc = torch.broadcast_to(coeffs[-1], x.shape)
    for c in reversed(coeffs[:-1]):
        acc = c + x * acc
    return acc


def polynomial(coeffs: Sequence[Tensor], r: Tensor) -> Tensor:
    """``P(r) = sum_{m=1..M} eps_m r^m`` for ``coeffs = [eps_1, ..., eps_M]``."""
    return r * horner(coeffs, r)


def derivative(coeffs: Sequence[Tensor], order: int) -> list[Tensor]:
    """Coefficients (of ``r^0, r^1, ...``) of the ``order``-th derivative of
    ``P(r) = sum_{m=1..M} eps_m r^m`` given ``coeffs = [eps_1, ..., eps_M]``."""
    if order == 1:
        return [m * e for m, e in enumerate(coeffs, start=1)]
    if order == 2:
        return [m * (m - 1) * e for m, e in enumerate(coeffs, start=1)][1:]
    raise ValueError(f"order must be 1 or 2, got {order}")


def perturbation_rows(teacher_logp: Tensor, student_logp: Tensor, eps: Tensor) -> Tensor:
    """``sum_c p_c sum_m eps_{c,m} (1 - q_c)^m`` per row (eq. 7, second term).

    ``eps`` is ``[M]`` (shared), ``[C, M]`` or ``[n, C, M]`` (per row).
    Classes with ``p_c = 0`` contribute exactly 0.
    """
    p = teacher_logp.exp()
    r = log1m_softmax(student_logp).exp()
    return (p * polynomial(eps.to(r.dtype).unbind(-1), r)).sum(dim=-1)


def ptloss_rows(teacher_logp: Tensor, student_logp: Tensor, eps: Tensor) -> Tensor:
    """``l_PT-M(p, q) = KL(p || q) + sum_c p_c P_c(1 - q_c)`` per row (eq. 7),
    from normalised log-probabilities (no temperature factor)."""
    return kl_rows(teacher_logp, student_logp) + perturbation_rows(teacher_logp, student_logp, eps)
