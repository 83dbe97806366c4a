"""Numerically robust building blocks shared by the distillation losses.

Conventions (docs/conventions.md): everything works in log space; a probability that
is exactly 0 (a ``-inf`` logit, e.g. a padded vocabulary column, or an
underflow) contributes 0 to a sum ``p * (...)`` and no NaN to the gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
_LOG2E = 1.0 / math.log(2.0)


def upcast(x: Tensor) -> Tensor:
    """float16 / bfloat16 to float32; other dtypes as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def scaled_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``logits / T``, in float32 at least."""
    z = upcast(logits)
    return z / temperature if temperature != 1.0 else z


def log_softmax_t(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / T)`` over the last dim, in float32 at least."""
    return torch.log_softmax(scaled_logits(logits, temperature), dim=-1)


def exp(x: Tensor, scale: float = 1.0, out: Tensor | None = None) -> Tensor:
    """``exp(scale * x)``, into ``out`` when given (``out=x``: in place). On the
    CPU it is computed as ``exp2(x * scale * log2 e)``: torch's CPU ``exp`` takes
    about 4x the time of its ``exp2`` on float32 and float64, and 15-30x where
    results are subnormal (float32 log-probabilities below -87, common under a
    confident teacher), which made it the largest single cost of the logit
    losses (docs/benchmarks.md). The product's rounding adds a relative error of
    at most ``|scale * x|`` units in the last place of ``x``'s dtype."""
    if x.device.type == "cpu":
        return torch.mul(x, scale * _LOG2E, out=out).exp2_()
    if scale == 1.0:
        return torch.exp(x, out=out)
    return torch.mul(x, scale, out=out).exp_()


def _shifted_exp(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, e, mass)`` of logits ``z`` (float32 at least): ``x = z - max z`` per
    row, ``e = exp(x / T)`` and ``mass = sum e`` per row (keepdim), so that
    ``softmax(z / T) = e / mass`` and ``log_softmax(z / T) = x / T - log mass``."""
    z = upcast(logits)
    x = z - z.amax(-1, keepdim=True)
    e = exp(x, 1.0 / temperature)
    return x, e, e.sum(-1, keepdim=True)


def masked_where_zero(p: Tensor, x: Tensor) -> Tensor:
    """``x`` with entries where ``p == 0`` replaced by 0, gradient-safe."""
    return x.masked_fill(p == 0, 0.0)


def _kl_terms_sum(p: Tensor, d: Tensor, mask_all: bool, overwrite: bool = False) -> Tensor:
    """``sum_k p_k d_k`` per row (``d = log p - log q`` up to a per-row scale and
    shift, ``p`` up to a per-row scale), a term being 0 where ``p_k = 0``.

    ``p_k * d_k`` is NaN there when ``log q_k = -inf`` (or both are ``-inf``).
    With ``mask_all`` (or off the CPU: no host synchronisation) ``d`` is zeroed
    where ``p = 0`` in place; otherwise the sum is taken unmasked and only rows
    that came out NaN are recomputed with the mask, written back into ``d``
    (a row that is NaN from NaN inputs stays NaN): a mask over every element
    costs more on the CPU than the rest of the divergence. ``overwrite``: ``d``
    is not needed afterwards and holds the products on return.
    """
    if mask_all or p.device.type != "cpu":
        d.masked_fill_(p == 0, 0.0)
        return d.mul_(p).sum(-1) if overwrite else (p * d).sum(-1)
    terms = d.mul_(p) if overwrite else p * d
    out = terms.sum(-1)
    if math.isnan(out.sum()):  # NaN whenever a row is
        bad = out.isnan()
        p_bad = p[bad]
        if overwrite:
            out[bad] = terms[bad].masked_fill_(p_bad == 0, 0.0).sum(-1)
        else:
            d_bad = d[bad].masked_fill_(p_bad == 0, 0.0)
            d[bad] = d_bad  # masked for the gradients too
            out[bad] = (p_bad * d_bad).sum(-1)
    return out


class _KLRows(torch.autograd.Function):
    """``sum_k p_k (log p_k - log q_k)`` with its gradients written out:
    ``d/d log q = -p`` and ``d/d log p = p (log p - log q + 1)``, both 0 where
    ``p = 0``. One saved tensor and one multiplication in the backward pass,
    where autograd would keep three and take three passes."""

    @staticmethod
    def forward(ctx, p_logp: Tensor, q_logp: Tensor) -> Tensor:
        p = exp(p_logp)
        d = p_logp - q_logp
        out = _kl_terms_sum(p, d, mask_all=ctx.needs_input_grad[0])
        ctx.save_for_backward(p, d if ctx.needs_input_grad[0] else None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        p, d = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        grad_p = p * (d + 1) * g if ctx.needs_input_grad[0] else None
        grad_q = p * -g if ctx.needs_input_grad[1] else None
        return grad_p, grad_q


class _KDRows(torch.autograd.Function):
    """Hinton KD per row from logits, fused: ``T^2 KL(p || q)`` with
    ``p = softmax(z_t / T)``, ``q = softmax(z_s / T)``, or ``T^2 KL(q || p)``
    with ``reverse``. The softmaxes, the divergence and the gradients are in one
    function, with the gradients written out (zero-probability terms as in
    :func:`kl_rows`):

    - forward KL: ``d/dz_s = T (q - p)``, ``d/dz_t = T p (log p - log q - KL)``;
    - reverse KL: ``d/dz_s = T q (log q - log p - KL)``, ``d/dz_t = T (p - q)``.

    With ``a = e_a / m_a`` the "from" distribution and ``b = e_b / m_b`` the
    other (:func:`_shifted_exp`), ``KL(a || b) = sum_k e_k (x_a - x_b)_k / (m_a T)
    - log(m_a / m_b)``: the softmaxes are never normalised element-wise, and the
    shifts cancel because ``sum a = 1``.
    """

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, temperature: float, reverse: bool) -> Tensor:
        s, t = _shifted_exp(student, temperature), _shifted_exp(teacher, temperature)
        (x_a, e_a, m_a), (x_b, e_b, m_b) = (s, t) if reverse else (t, s)
        needs_d = ctx.needs_input_grad[0] if reverse else ctx.needs_input_grad[1]
        diff = x_a.sub_(x_b)  # T (log a - log b + log(m_a / m_b))
        m_a, m_b = m_a.squeeze(-1), m_b.squeeze(-1)
        log_ratio = torch.log(m_a / m_b)
        kl = _kl_terms_sum(e_a, diff, mask_all=False, overwrite=not needs_d).div_(m_a * temperature).sub_(log_ratio)
        offset = log_ratio.add_(kl) if needs_d else None  # log(m_a / m_b) + KL, for the "from" side's gradient
        ctx.temperature, ctx.reverse = temperature, reverse
        ctx.save_for_backward(e_a, m_a, e_b, m_b, diff if needs_d else None, offset)
        return kl * (temperature * temperature)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        e_a, m_a, e_b, m_b, diff, offset = ctx.saved_tensors
        t = ctx.temperature
        g = grad * t
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_a, need_b = (need_s, need_t) if ctx.reverse else (need_t, need_s)
        # the "from" side: T g a (log a - log b - KL) = (g / m_a) e_a (diff - T (log(m_a / m_b) + KL))
        grad_a = (diff - (offset * t).unsqueeze(-1)).mul_(e_a).mul_((grad / m_a).unsqueeze(-1)) if need_a else None
        # the other side: T g (b - a)
        grad_b = torch.mul(e_b, (g / m_b).unsqueeze(-1)).addcmul_(e_a, (-g / m_a).unsqueeze(-1)) if need_b else None
        grad_s, grad_t = (grad_a, grad_b) if ctx.reverse else (grad_b, grad_a)
        return grad_s, grad_t, None, None


#: inputs of at most this many elements take :func:`kd_rows`'s composite of native
#: operations: at that size each operation costs more than its arithmetic, and
#: autograd's native backward nodes less than the fused function's Python
#: (measured inside training steps, docs/benchmarks.md)
COMPOSITE_MAX_ELEMENTS = 1 << 15


def _kd_rows_composite(student: Tensor, teacher: Tensor, temperature: float, reverse: bool) -> Tensor:
    """:func:`kd_rows` through autograd: log-softmaxes, then ``sum a (log a - log b)``
    with the terms where ``a = 0`` masked (value and gradient 0)."""
    logq, logp = log_softmax_t(student, temperature), log_softmax_t(teacher, temperature)
    a_log, b_log = (logq, logp) if reverse else (logp, logq)
    a = a_log.exp()
    return (a * (a_log - b_log).masked_fill(a == 0, 0.0)).sum(-1) * (temperature * temperature)


def kd_rows(student: Tensor, teacher: Tensor, temperature: float, reverse: bool = False) -> Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))`` per row from
    logits (Hinton et al. 2015), value and gradients fused; the same values as
    ``T^2 * kl_rows(log_softmax_t(teacher, T), log_softmax_t(student, T))``.
    ``reverse``: ``T^2 KL(student || teacher)`` instead. Differentiable once
    (no double backward). Inputs of at most :data:`COMPOSITE_MAX_ELEMENTS`
    elements are computed by a composite of native operations instead, with
    the same values and gradients."""
    if student.numel() <= COMPOSITE_MAX_ELEMENTS:
        return _kd_rows_composite(student, teacher, float(temperature), bool(reverse))
    return _KDRows.apply(student, teacher, float(temperature), bool(reverse))


def kl_rows(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """``KL(p || q) = sum_k p_k (log p_k - log q_k)`` per row (last dim reduced).

    Terms with ``p_k = 0`` are exactly 0 (value and gradient) even where
    ``log q_k = -inf``. Differentiable once (no double backward).
    """
    return _KLRows.apply(p_logp, q_logp)


def ce_rows(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """Cross entropy ``-sum_k p_k log q_k`` per row, 0 where ``p_k = 0``."""
    p = exp(p_logp)
    return -(p * masked_where_zero(p, q_logp)).sum(-1)


def split_target(logits: Tensor, target: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Decompose ``softmax(logits / T)`` around the target class (TAND paper sec. 2).

    ``logits`` may be logits or log-probabilities (rows are normalised here).
    Returns ``(log_b, log_rho)``: ``log_b = [log p_t, log(1 - p_t)]`` (shape
    ``[..., 2]``) and ``log_rho``, the non-target distribution renormalised over
    classes ``!= t`` (``-inf`` at the target). Both are computed from the
    logits shifted by their own maxima, so ``log_rho`` keeps the gaps between
    non-target classes even where ``p_t`` rounds to 1 (logits 1e8 apart), and
    ``log(1 - p_t)`` is exact where ``1 - p_t`` underflows.
    """
    x = scaled_logits(logits, temperature)
    idx = target.unsqueeze(-1)
    x_t = x.gather(-1, idx).squeeze(-1)
    nontarget = x.scatter(-1, idx, float("-inf"))
    top = nontarget.amax(-1, keepdim=True)
    no_rest = torch.isneginf(top)  # one real column: no non-target distribution, 1 - p_t = 0
    shifted = nontarget - torch.where(no_rest, 0.0, top)
    # the non-target mass relative to its largest term, in [1, C); 0 (clamped, so
    # that log and gradients stay finite) where there is none
    mass = exp(shifted).sum(-1, keepdim=True)
    log_mass = mass.clamp(min=torch.finfo(mass.dtype).tiny).log()
    log_rho = shifted - log_mass
    # log((1 - p_t) / p_t), from differences only (-inf where there is no rest)
    delta = (top - x_t.unsqueeze(-1) + log_mass).squeeze(-1)
    log_b = torch.stack([-F.softplus(delta), -F.softplus(-delta)], dim=-1)
    return log_b, log_rho


def flatten_rows(student: Tensor, teacher: Tensor | None, target: Tensor | None
                 ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Check shapes and flatten ``[B, T, C]`` / ``[B, T]`` to ``[N, C]`` / ``[N]``."""
    if student.dim() < 2:
        raise ValueError(f"student logits must be [N, C] or [B, T, C], got shape {tuple(student.shape)}")
    if teacher is not None and teacher.shape != student.shape:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} and student logits "
                         f"{tuple(student.shape)} differ in shape")
    if target is not None and tuple(target.shape) != tuple(student.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits "
                         f"{tuple(student.shape)} (expected {tuple(student.shape[:-1])})")
    if student.dim() == 2:
        return student, teacher, target
    c = student.shape[-1]
    s = student.reshape(-1, c)
    t = None if teacher is None else teacher.reshape(-1, c)
    y = None if target is None else target.reshape(-1)
    return s, t, y


def decoupled_terms(teacher: Tensor, student: Tensor, target: Tensor,
                    tckd_divergence, nckd_divergence, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-row ``(TCKD, NCKD)`` of Decoupled KD (Zhao et al. 2022; TAND paper eq. 3-5)
    between ``softmax(teacher / T)`` and ``softmax(student / T)`` (logits or
    log-probabilities): ``TCKD = D_t(b^t || b^s)`` on the binary target-vs-rest
    distributions and ``NCKD = D_n(rho^t || rho^s)`` on the renormalised
    non-target distributions. With D = KL, ``KL(p || q) = TCKD + (1 - p_t) * NCKD``
    (TAND paper thm 2.1)."""
    t_b, t_rho = split_target(teacher, target, temperature)
    s_b, s_rho = split_target(student, target, temperature)
    return tckd_divergence(t_b, s_b), nckd_divergence(t_rho, s_rho)


class TargetSplit(NamedTuple):
    """Per-row terms of the target / non-target decomposition (TAND paper sec. 2,
    eq. 3-5, 7) between a teacher ``p = softmax(teacher / T)`` and a student
    ``q = softmax(student / T)``, from :func:`target_split_terms`.

    ``tckd = KL(b^t || b^s)`` on ``b = [p_t, 1 - p_t]``; ``nckd = KL(rho^t || rho^s)``
    on the non-target distributions renormalised over the classes ``!= t``;
    ``log_qt`` / ``log_pt`` the target log-probabilities at ``T``; ``entropy``
    ``H(rho^t)`` (so ``CE(rho^t, rho^s) = nckd + entropy``, NKD's non-target term)
    or ``None`` when not asked for. ``log_pt`` and ``entropy`` depend on the teacher only.
    """

    tckd: Tensor
    nckd: Tensor
    log_qt: Tensor
    log_pt: Tensor
    entropy: Tensor | None


def _side(x: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(log_rho, log_mass, delta)`` of scaled logits ``x`` (see :func:`split_target`);
    ``log_rho`` is ``-inf`` at the target, and is a new tensor (``x`` is not changed)."""
    x_t = x.gather(-1, idx)
    log_rho = x.scatter(-1, idx, float("-inf"))
    top = log_rho.amax(-1, keepdim=True)
    log_rho.sub_(top.masked_fill(torch.isneginf(top), 0.0))  # one real column: nothing to shift
    mass = exp(log_rho).sum(-1, keepdim=True)
    log_mass = mass.clamp_(min=torch.finfo(mass.dtype).tiny).log_()
    log_rho.sub_(log_mass)
    delta = (top - x_t + log_mass).squeeze(-1)  # log((1 - p_t) / p_t)
    return log_rho, log_mass, delta


def _binary_kl(lp1: Tensor, lp0: Tensor, lq1: Tensor, lq0: Tensor) -> Tensor:
    """``KL([p_t, 1 - p_t] || [q_t, 1 - q_t])`` from the four logs, 0-probability terms 0."""
    p1, p0 = lp1.exp(), lp0.exp()
    return torch.where(p1 == 0, 0.0, p1 * (lp1 - lq1)) + torch.where(p0 == 0, 0.0, p0 * (lp0 - lq0))


class _TargetSplit(torch.autograd.Function):
    """:func:`target_split_terms` for a teacher without gradients, fused: both
    decompositions, TCKD, NCKD and ``log q_t`` in one pass over the classes,
    with the student gradients written out (``x = z / T``, ``k != t``):

    - ``d NCKD / d x_k = rho^s_k - rho^t_k``, ``d NCKD / d x_t = 0``;
    - ``d TCKD / d x_k = (p_t - q_t) rho^s_k``, ``d TCKD / d x_t = q_t - p_t``;
    - ``d log q_t / d x_k = -(1 - q_t) rho^s_k``, ``d log q_t / d x_t = 1 - q_t``.
    """

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, target: Tensor, temperature: float, entropy: bool):
        idx = target.unsqueeze(-1)
        s_log_rho, _, s_delta = _side(scaled_logits(student, temperature), idx)
        t_log_rho, _, t_delta = _side(scaled_logits(teacher, temperature), idx)
        log_qt, log_q0 = -F.softplus(s_delta), -F.softplus(-s_delta)
        log_pt, log_p0 = -F.softplus(t_delta), -F.softplus(-t_delta)
        tckd = _binary_kl(log_pt, log_p0, log_qt, log_q0)
        t_rho = exp(t_log_rho)
        h = torch.special.entr(t_rho).sum(-1) if entropy else None
        d = t_log_rho.sub_(s_log_rho).scatter_(-1, idx, 0.0)  # log rho^t - log rho^s, 0 at the target
        nckd = _kl_terms_sum(t_rho, d, mask_all=False)
        ctx.temperature, ctx.dtype = temperature, student.dtype
        ctx.save_for_backward(s_log_rho, t_rho, log_qt, log_pt, idx)
        ctx.mark_non_differentiable(log_pt, *(() if h is None else (h,)))
        return tckd, nckd, log_qt, log_pt, h

    @staticmethod
    @once_differentiable
    def backward(ctx, g_tckd, g_nckd, g_logqt, _g_logpt, _g_h):
        s_log_rho, t_rho, log_qt, log_pt, idx = ctx.saved_tensors
        zero = torch.zeros_like(log_qt)
        g_tc = zero if g_tckd is None else g_tckd
        g_nc = zero if g_nckd is None else g_nckd
        g_lq = zero if g_logqt is None else g_logqt
        q_t, p_t = log_qt.exp(), log_pt.exp()
        # coefficient of rho^s_k (k != t) and the target's own gradient, per row
        coef = g_nc + g_tc * (p_t - q_t) - g_lq * (1 - q_t)
        at_target = g_tc * (q_t - p_t) + g_lq * (1 - q_t)
        grad = exp(s_log_rho).mul_(coef.unsqueeze(-1)).addcmul_(t_rho, g_nc.neg().unsqueeze(-1))
        grad.scatter_(-1, idx, at_target.unsqueeze(-1))
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad.to(ctx.dtype), None, None, None, None


def target_split_terms(student: Tensor, teacher: Tensor, target: Tensor, temperature: float = 1.0,
                       entropy: bool = False) -> TargetSplit:
    """TCKD, NCKD (both with KL) and the target log-probabilities per row, the
    pieces of DKD, NKD, TAND and ABDKD's TCKD (TAND paper eq. 3-5, 7-9; see
    :class:`TargetSplit`), from logits (or log-probabilities) ``[n, C]`` and
    targets ``[n]``.

    Where the teacher needs no gradient (the usual case) one fused autograd
    function computes them with the student's gradients written out: about
    half the passes of :func:`split_target` + :func:`kl_rows`. Otherwise
    (a teacher that requires grad) they come from :func:`split_target` and
    :func:`kl_rows`. Both paths keep the robustness of :func:`split_target`:
    finite on ``-inf`` columns (0-probability terms are 0), on logits far
    apart, and in float32 for float16 / bfloat16 inputs. Differentiable once.
    """
    t = float(temperature)
    if not (teacher.requires_grad and torch.is_grad_enabled()):
        return TargetSplit(*_TargetSplit.apply(student, teacher, target, t, bool(entropy)))
    (t_b, t_rho), (s_b, s_rho) = split_target(teacher, target, t), split_target(student, target, t)
    h = ce_rows(t_rho, t_rho) if entropy else None  # H(rho^t), gradient-safe where rho^t = 0
    return TargetSplit(kl_rows(t_b, s_b), kl_rows(t_rho, s_rho), s_b[..., 0], t_b[..., 0], h)
