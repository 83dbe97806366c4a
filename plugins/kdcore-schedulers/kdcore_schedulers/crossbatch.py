"""Cross-batch gradient-consistency weighting (cross-batch weighting paper sec. 2, eqs. 4-11).

Inputs are flat gradients over the student's parameters: ``g_ce`` and
``g_kd`` of the CE and distillation terms on the batch B1, and ``G`` (``g_ref``)
of the CE term on an auxiliary batch B2 at the same parameters.

* **Eq. 5-6** (``mode="paper"``): ``min (u . w)^2`` with
  ``u = [g_ce . G, g_kd . G]`` over the simplex ``w_ce + w_kd = 1, w >= 0``
  (the paper's ``w_ce + w_kd <= 1`` admits the trivial ``w = 0``).
  Closed form: the root ``w_ce = u_kd / (u_kd - u_ce)`` when it lies in
  [0, 1], else the vertex with the smaller ``|u_i|`` (CE on a tie); ``w = (1/2, 1/2)``
  when ``u_ce = u_kd`` (every ``w`` is optimal).
* **Eq. 7-8** rescale ``w~_i = w_i (|w_ce g_ce| + |w_kd g_kd|) / |w_i g_i|``
  ``= (|w_ce g_ce| + |w_kd g_kd|) / |g_i|`` (also the limit where ``w_i = 0``),
  and **eq. 9** sets ``w_ce = 1, w_kd = w~_kd / w~_ce``. Hence the *finding*:
  ``w_kd = |g_ce| / |g_kd|`` whatever eq. 5 returned, interior or boundary
  (limit), so in this mode ``G`` does not change the update.
* ``mode="align"`` (our variant, in which ``G`` steers the weights): choose
  ``w`` on the simplex maximising ``cos(w_ce g_ce/|g_ce| + w_kd g_kd/|g_kd|, G)``
  (the norm-balanced combination), keep ``w`` through the norm balance
  (``w~_i = w_i / |g_i|``) and apply eq. 9: ``w_kd = (w_kd |g_ce|) / (w_ce |g_kd|)``,
  capped at :data:`ALIGN_MAX_RATIO` at the vertex ``w_ce = 0`` (where it is
  infinite and ``g`` tends to ``g0 + c |g0| g_kd / |g_kd|``).
* **Eq. 10-11**: ``g0 = (g_ce + g_kd) / 2``, ``g_w = w_ce g_ce + w_kd g_kd``,
  ``lam = c |g0| / |g_w|``, ``g = g0 + lam g_w``
  ``= (1/2 + lam w_ce) g_ce + (1/2 + lam w_kd) g_kd``.

Degenerate inputs never give NaN: a zero ``g_ce`` or ``g_kd`` gives
``w_kd = 0`` (eq. 9 is 0 or unbounded there and the term contributes
nothing); ``lam = 0`` when ``|g_w|`` is zero up to float rounding (its
direction is undefined); cosines with a zero vector are 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdcore.common import params
from kdcore_schedulers.vecmath import fits, gram_matrix, max_abs, vector_norm

MODES = ("paper", "align")
#: cap on eq. 9's ``w_kd`` in ``mode="align"`` when ``w_ce = 0`` (KD-only direction)
ALIGN_MAX_RATIO = 1e6
#: ``|g_w|`` below this many float epsilons times ``|g_ce| + w_kd |g_kd|`` counts as zero
_ROUNDING_EPS = 16
#: ``|g_w|^2`` is taken from the Gram matrix when at least this share of ``(|g_ce| + w_kd |g_kd|)^2``
#: (cancellation then amplifies the Gram matrix's rounding at most 4 times)
_GRAM_SAFE = 0.25


def _cos(dot: float, na: float, nb: float) -> float:
    return max(-1.0, min(1.0, dot / (na * nb))) if na > 0 and nb > 0 else 0.0


def simplex_weights(u_ce: float, u_kd: float) -> float:
    """``w_ce`` minimising ``(u_ce w_ce + u_kd (1 - w_ce))^2`` on [0, 1] (eq. 5-6)."""
    if u_ce == u_kd:
        return 0.5
    root = u_kd / (u_kd - u_ce)
    if 0.0 <= root <= 1.0:
        return root
    return 1.0 if abs(u_ce) <= abs(u_kd) else 0.0


def align_weights(cos_ce: float, cos_kd: float, cos_ce_kd: float) -> float:
    """``w_ce`` on [0, 1] maximising ``cos(w_ce e_ce + (1 - w_ce) e_kd, G)`` for unit
    vectors ``e_i`` with ``cos(e_i, G) = cos_i`` and ``e_ce . e_kd = cos_ce_kd``.

    The projection of ``G`` on span(e_ce, e_kd) is ``a e_ce + b e_kd`` with
    ``[[1, r], [r, 1]] [a, b] = [cos_ce, cos_kd]``. If it lies inside the cone
    (``a, b >= 0``, not both 0) the optimum is ``w_ce = a / (a + b)``; otherwise
    it is the edge closer to it, the one with the larger cosine (CE on a tie).
    With no information (``cos_ce = cos_kd = 0``) it is ``1/2``, as in the paper's mode.
    """
    if cos_ce == 0.0 and cos_kd == 0.0:
        return 0.5
    det = 1.0 - cos_ce_kd * cos_ce_kd
    if det > 1e-12:
        a = (cos_ce - cos_ce_kd * cos_kd) / det
        b = (cos_kd - cos_ce_kd * cos_ce) / det
        if a >= 0.0 and b >= 0.0 and a + b > 0.0:
            return a / (a + b)
    return 1.0 if cos_ce >= cos_kd else 0.0


def _combination(g_ce: Tensor, g_kd: Tensor, w_kd: float, n_kd: float) -> Tensor:
    """``g_ce + w_kd g_kd``, scaling ``g_kd`` first where ``w_kd`` is beyond the float range."""
    if fits(g_kd.dtype, w_kd, w_kd * n_kd):
        return torch.add(g_ce, g_kd, alpha=w_kd)
    s_kd = max_abs(g_kd)
    return torch.add(g_ce, g_kd / s_kd, alpha=w_kd * s_kd)


def crossbatch_update(g_ce: Tensor, g_kd: Tensor, g_ref: Tensor, *, c: float = 0.5,
                      mode: str = "paper") -> tuple[Tensor, dict[str, float]]:
    """The update ``g`` of eq. 11 and the step's scalars.

    ``info`` holds ``w_ce`` (= 1) and ``w_kd`` (eq. 9), ``lam`` (eq. 10),
    ``simplex_ce`` / ``simplex_kd`` (the simplex weights before eq. 8),
    ``u_ce`` / ``u_kd`` (eq. 6), ``coef_ce`` / ``coef_kd`` (the coefficients
    of ``g_ce`` / ``g_kd`` in ``g``), the cosines ``cos_ce_ref``,
    ``cos_kd_ref``, ``cos_ce_kd``, ``cos_update_ref`` and the norms
    ``norm_ce``, ``norm_kd``, ``norm_ref``, ``norm_update`` (all from the
    Gram matrix of the inputs and the coefficients).
    """
    c = params.non_negative("c", c)
    mode = params.one_of("mode", mode, MODES)
    g_ce, g_kd, g_ref = (v.reshape(-1) for v in (g_ce, g_kd, g_ref))
    gram = gram_matrix([g_ce, g_kd, g_ref])
    n_ce, n_kd, n_ref = (math.sqrt(max(gram[i][i], 0.0)) for i in range(3))
    u_ce, u_kd = gram[0][2], gram[1][2]
    cos_ce, cos_kd, cos_ce_kd = _cos(u_ce, n_ce, n_ref), _cos(u_kd, n_kd, n_ref), _cos(gram[0][1], n_ce, n_kd)

    if mode == "paper":
        w = simplex_weights(u_ce, u_kd)
        # eq. 8 (limit form) then eq. 9: w~_kd / w~_ce = |g_ce| / |g_kd|, independent of w
        w_kd = n_ce / n_kd if n_ce > 0 and n_kd > 0 else 0.0
    else:
        w = align_weights(cos_ce, cos_kd, cos_ce_kd)
        if n_ce == 0 or n_kd == 0 or w == 1.0:
            w_kd = 0.0
        elif w == 0.0:
            w_kd = ALIGN_MAX_RATIO
        else:
            w_kd = min((1.0 - w) * n_ce / (w * n_kd), ALIGN_MAX_RATIO)

    # eq. 10. |g_w|^2 from the Gram matrix unless it cancels heavily (g_ce, g_kd far
    # from agreeing), where the vector itself is formed (and g_kd scaled first when
    # w_kd is beyond the float range)
    k00, k01, k11 = gram[0][0], gram[0][1], gram[1][1]
    quad = k00 + 2.0 * w_kd * k01 + w_kd * w_kd * k11
    g_w = None
    if quad >= _GRAM_SAFE * (n_ce + w_kd * n_kd) ** 2:
        n_w = math.sqrt(quad)
    else:
        g_w = _combination(g_ce, g_kd, w_kd, n_kd)
        n_w = vector_norm(g_w)
    tol = _ROUNDING_EPS * torch.finfo(g_ce.dtype).eps * (n_ce + w_kd * n_kd)
    n_0 = 0.5 * math.sqrt(max(k00 + 2.0 * k01 + k11, 0.0))
    lam = c * n_0 / n_w if n_w > tol else 0.0
    coef_ce, coef_kd = 0.5 + lam, 0.5 + lam * w_kd

    # eq. 11: g = g0 + lam g_w = coef_ce g_ce + coef_kd g_kd
    if fits(g_ce.dtype, coef_ce, coef_kd, coef_ce * n_ce, coef_kd * n_kd):
        g = (g_ce * coef_ce).add_(g_kd, alpha=coef_kd)
    else:  # lam g_w as (lam s_w) (g_w / s_w): both factors stay in range
        g = torch.add(g_ce, g_kd).mul_(0.5)
        g_w = _combination(g_ce, g_kd, w_kd, n_kd) if g_w is None else g_w
        s_w = max_abs(g_w)
        if lam > 0.0 and s_w > 0.0:
            g.add_(g_w.div_(s_w), alpha=lam * s_w)
    n_g = math.sqrt(max(coef_ce * coef_ce * k00 + 2.0 * coef_ce * coef_kd * k01 + coef_kd * coef_kd * k11, 0.0))
    info = {
        "w_ce": 1.0, "w_kd": w_kd, "lam": lam, "simplex_ce": w, "simplex_kd": 1.0 - w,
        "u_ce": u_ce, "u_kd": u_kd, "coef_ce": coef_ce, "coef_kd": coef_kd,
        "cos_ce_ref": cos_ce, "cos_kd_ref": cos_kd, "cos_ce_kd": cos_ce_kd,
        "cos_update_ref": _cos(coef_ce * u_ce + coef_kd * u_kd, n_g, n_ref),
        "norm_ce": n_ce, "norm_kd": n_kd, "norm_ref": n_ref, "norm_update": n_g,
    }
    return g, info
