"""Divergences for token-level distillation (definitions: docs/methods/divergences.md).
``p`` is the teacher, ``q`` the student, per row.

Every divergence here is ``div(teacher_logp, student_logp)``: log-probabilities
normalised over the last dim in, the value per row out (last dim reduced).

Numerics (methods.md, "Conventions"):

* Log space throughout. A mixture ``m = w a + (1 - w) b`` is only ever used as
  ``log m = logaddexp(log w + log a, log(1 - w) + log b)``, never as the log of
  a probability sum (which underflows to ``log 0`` where both do).
* A term weighted by a zero probability (``-inf`` log-probability: a padded
  vocabulary column, or an underflow) is exactly 0, in value and gradient,
  even where the other model's log-probability is ``-inf`` too. For ``jsd``,
  ``skew_kl`` and ``skew_rkl`` log-probabilities are clamped at
  ``LOG_ZERO = -1e30`` first: ``exp(-1e30)`` is exactly 0 in every float type,
  so nothing changes except that no ``inf - inf`` (NaN) can arise. Every term
  of these three divergences is then bounded, so values and gradients are
  finite for every input (``KL(a || m) <= -log w``).
* Values and gradients come from one autograd function per divergence, with
  the gradients written out (they share their terms with the value) and rows
  processed in cache-sized blocks. Differentiable once (no double backward),
  like kdcore's ``kl``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdcore import ConfigError
from kdcore.common import params

#: stand-in for ``log 0``: finite, so that no ``inf - inf`` arises; ``exp`` of it is 0
LOG_ZERO = -1e30
#: elements per block of rows (the block's temporaries stay in the L2/L3 cache)
BLOCK = 1 << 16


def _rows(teacher_logp: Tensor, student_logp: Tensor) -> tuple[Tensor, Tensor]:
    """Both inputs as contiguous ``[n, C]`` tensors of a common dtype, float32 at least."""
    if teacher_logp.shape != student_logp.shape:
        raise ValueError(f"teacher {tuple(teacher_logp.shape)} and student "
                         f"{tuple(student_logp.shape)} log-probabilities differ in shape")
    if teacher_logp.dim() < 1:
        raise ValueError("log-probabilities need at least one dimension (the classes)")
    dtype = torch.promote_types(torch.promote_types(teacher_logp.dtype, student_logp.dtype), torch.float32)
    c = teacher_logp.shape[-1]
    lp = teacher_logp.to(dtype).reshape(-1, c).contiguous()
    lq = student_logp.to(dtype).reshape(-1, c).contiguous()
    return lp, lq


def _blocks(n: int, c: int):
    step = max(1, BLOCK // max(c, 1))
    for i in range(0, n, step):
        yield slice(i, i + step)


def _scratch(ref: Tensor, need: bool) -> Tensor:
    """A gradient buffer for the whole input (kept) or for one block (reused)."""
    return torch.empty_like(ref) if need else None


class _BlockwiseRows(torch.autograd.Function):
    """Per-row values of ``kernel`` over ``[n, C]`` inputs, block by block. ``kernel(la,
    lb, ga, gb, *args)`` returns the block's row values and writes ``dV/d la``,
    ``dV/d lb`` into ``ga``, ``gb``; they are saved (only those needed) and the
    backward pass multiplies them by the incoming gradient."""

    @staticmethod
    def forward(ctx, la: Tensor, lb: Tensor, kernel, *args) -> Tensor:
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, c = la.shape
        rows = la.new_empty(n)
        ga, gb = _scratch(la, need_a), _scratch(lb, need_b)
        step = max(1, BLOCK // max(c, 1))
        tmp_a = None if need_a else la.new_empty(min(step, n), c)
        tmp_b = None if need_b else lb.new_empty(min(step, n), c)
        for sl in _blocks(n, c):
            k = la[sl].shape[0]
            out_a = ga[sl] if need_a else tmp_a[:k]
            out_b = gb[sl] if need_b else tmp_b[:k]
            block_args = [a[sl] if isinstance(a, Tensor) else a for a in args]  # per-row tensors
            rows[sl] = kernel(la[sl], lb[sl], out_a, out_b, *block_args)
        ctx.save_for_backward(ga, gb)
        return rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows: Tensor):
        ga, gb = ctx.saved_tensors
        g = grad_rows.unsqueeze(-1)
        grad_a = None if ga is None else ga * g
        grad_b = None if gb is None else gb * g
        return (grad_a, grad_b, None) + (None,) * (len(ctx.needs_input_grad) - 3)


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """``log(e^a + e^b)`` for finite ``a``, ``b``: ``max + log1p(e^-|a - b|)``, with
    ``log1p(e) = log(u) - (u - 1 - e) / u``, ``u = 1 + e`` (exact to rounding; on CPU
    ``torch.log1p`` and ``torch.logaddexp`` are several times slower than ``log``)."""
    mx = torch.maximum(a, b)
    e = torch.sub(a, b).abs_().neg_().exp_()
    u = e + 1.0
    corr = (u - 1.0).sub_(e).div_(u)
    return u.log_().sub_(corr).add_(mx)


def _jsd_kernel(lp: Tensor, lq: Tensor, gp: Tensor, gq: Tensor, beta: float, log_b: float,
                log_1b: float) -> Tensor:
    """``JSD_beta`` per row. With ``m = beta p + (1 - beta) q`` the gradients are
    ``dJSD/d log p = beta p (log p - log m)`` and ``dJSD/d log q = (1 - beta) q (log q - log m)``
    (the terms of ``d log m`` cancel against the ``+ p``, ``+ q`` of ``d (p log p)``),
    so the value is the row sum of the two gradients."""
    lp = lp.clamp(min=LOG_ZERO)
    lq = lq.clamp(min=LOG_ZERO)
    lm = _logaddexp(lp + log_b, lq + log_1b)
    torch.sub(lp, lm, out=gp).mul_(lp.exp_()).mul_(beta)
    torch.sub(lq, lm, out=gq).mul_(lq.exp_()).mul_(1.0 - beta)
    return gp.sum(-1) + gq.sum(-1)


def _skew_kernel(la: Tensor, lb: Tensor, ga: Tensor, gb: Tensor, log_w: float, log_1w: float) -> Tensor:
    """``KL(a || m)``, ``m = w a + (1 - w) b``, per row. With ``r = (1 - w) b / m`` (in
    [0, 1]): ``d/d log a = a (log a - log m) + a r`` and ``d/d log b = -a r``."""
    la = la.clamp(min=LOG_ZERO)
    lb = lb.clamp(min=LOG_ZERO).add_(log_1w)           # log((1 - w) b)
    lm = _logaddexp(la + log_w, lb)
    r = lb.sub_(lm).exp_()
    torch.sub(la, lm, out=ga).mul_(la.exp_())          # a (log a - log m); la is now a
    value = ga.sum(-1)
    torch.mul(la, r, out=gb).neg_()
    ga.sub_(gb)
    return value


def _tvd_kernel(lp: Tensor, lq: Tensor, gp: Tensor, gq: Tensor) -> Tensor:
    """``0.5 sum |p - q|`` per row; ``d/d log p = s p``, ``d/d log q = -s q`` with
    ``s = sign(p - q) / 2`` (0 where ``p = q``: the subgradient of ``|.|`` at 0)."""
    p = lp.exp()
    q = lq.exp()
    diff = p - q
    value = diff.abs().sum(-1).mul_(0.5)
    s = diff.sign_().mul_(0.5)
    torch.mul(s, p, out=gp)
    torch.mul(s, q, out=gq).neg_()
    return value


def _akl_kernel(lp: Tensor, lq: Tensor, gp: Tensor, gq: Tensor, w_head: Tensor, w_tail: Tensor) -> Tensor:
    """``w_h KL(p || q) + w_t KL(q || p)`` per row, the weights constants. With
    ``d = log p - log q``: ``d/d log p = w_h p (d + 1) - w_t q`` and
    ``d/d log q = w_t q (1 - d) - w_h p``; ``p d`` is 0 where ``p = 0``, ``q d`` where ``q = 0``."""
    wh = w_head.unsqueeze(-1)
    wt = w_tail.unsqueeze(-1)
    p = lp.exp()
    q = lq.exp()
    d = lp - lq
    pd = (p * d).masked_fill_(p == 0, 0.0)
    qd = (q * d).masked_fill_(q == 0, 0.0)
    value = w_head * pd.sum(-1) - w_tail * qd.sum(-1)
    torch.add(pd, p, out=gp).mul_(wh).sub_(q * wt)
    torch.sub(q, qd, out=gq).mul_(wt).sub_(p * wh)
    return value


def akl_weights(teacher_logp: Tensor, student_logp: Tensor, mu: float = 0.5) -> tuple[Tensor, Tensor]:
    """The adaptive-KL weights ``(g_head / g, g_tail / g)`` per row (``g = g_head + g_tail``;
    both 0 where ``g = 0``, i.e. ``p = q``), without gradient.

    The teacher's probabilities are sorted in descending order, ties in class
    order (a stable sort: the lower class index comes first), so the split is
    deterministic. The head is the first class together with every class
    whose cumulative teacher mass in that order, itself included, is ``<= mu``;
    the tail is the rest. ``g_head``, ``g_tail`` are the sums of ``|p - q|``
    over each. Zero-probability (``-inf``) columns sort last and add nothing.
    """
    with torch.no_grad():
        lp, lq = _rows(teacher_logp, student_logp)
        p = lp.exp()
        q = lq.exp()
        p_sorted, idx = torch.sort(p, dim=-1, descending=True, stable=True)
        gap = (p_sorted - q.gather(-1, idx)).abs_()
        head = torch.cumsum(p_sorted, dim=-1) <= mu
        head[:, 0] = True
        g_head = torch.where(head, gap, 0.0).sum(-1)
        g_tail = torch.where(head, 0.0, gap).sum(-1)
        total = g_head + g_tail
        some = total > 0
        safe = torch.where(some, total, 1.0)
        w_head = torch.where(some, g_head / safe, 0.0)
        w_tail = torch.where(some, g_tail / safe, 0.0)
        shape = teacher_logp.shape[:-1]
        return w_head.reshape(shape), w_tail.reshape(shape)


def akl_rows(teacher_logp: Tensor, student_logp: Tensor, w_head: Tensor, w_tail: Tensor) -> Tensor:
    """``w_head KL(p || q) + w_tail KL(q || p)`` per row for given weights (constants:
    no gradient flows into them): the adaptive KL once :func:`akl_weights` has fixed them."""
    lp, lq = _rows(teacher_logp, student_logp)
    wh = w_head.detach().to(lp.dtype).reshape(-1)
    wt = w_tail.detach().to(lp.dtype).reshape(-1)
    return _BlockwiseRows.apply(lp, lq, _akl_kernel, wh, wt).reshape(teacher_logp.shape[:-1])


def _open_unit(name: str, value) -> float:
    """A number strictly between 0 and 1."""
    v = params.number(name, value)
    if not 0.0 < v < 1.0:
        raise ConfigError(f"{name}: must be in (0, 1), got {value!r} (the family vanishes at "
                          "the endpoints: use the divergence 'kl' or 'rkl' for those limits)")
    return v


class GeneralizedJSD:
    """``jsd``: the generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024,
    eq. 1; TRL's ``generalized_jsd_loss`` for ``0 < beta < 1``):
    ``m = beta p + (1 - beta) q``, ``JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m)``.

    ``beta`` weights the teacher, in the mixture and in the sum; ``0 < beta < 1``,
    default 0.5 (the symmetric JSD, at most ``log 2``). As ``beta -> 0`` or ``1``
    the divergence vanishes (``JSD_beta ~ beta KL(p || q)`` near 0); use ``kl``
    / ``rkl`` for those limits. ``log m`` is a logsumexp of ``log beta + log p``
    and ``log(1 - beta) + log q``.
    """

    def __init__(self, beta: float = 0.5):
        self.beta = _open_unit("beta", beta)
        self._log_b = math.log(self.beta)
        self._log_1b = math.log1p(-self.beta)

    def __call__(self, teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
        lp, lq = _rows(teacher_logp, student_logp)
        rows = _BlockwiseRows.apply(lp, lq, _jsd_kernel, self.beta, self._log_b, self._log_1b)
        return rows.reshape(teacher_logp.shape[:-1])

    def __repr__(self) -> str:
        return f"GeneralizedJSD(beta={self.beta:g})"


class _Skew:
    """``KL(a || alpha a + (1 - alpha) b)`` with ``(a, b)`` the teacher and student
    (``skew_kl``) or the student and teacher (``skew_rkl``)."""

    reverse = False

    def __init__(self, alpha: float = 0.1):
        self.alpha = params.in_range("alpha", alpha, 0.0, 1.0)
        self._log_w = math.log(self.alpha) if self.alpha > 0 else -math.inf
        self._log_1w = math.log1p(-self.alpha)

    def __call__(self, teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
        lp, lq = _rows(teacher_logp, student_logp)
        la, lb = (lq, lp) if self.reverse else (lp, lq)
        if self.alpha == 0:  # plain KL, whose terms can be infinite (b_k = 0 < a_k)
            from kdcore.losses.functional import kl_rows
            rows = kl_rows(la, lb)
        else:
            rows = _BlockwiseRows.apply(la, lb, _skew_kernel, self._log_w, self._log_1w)
        return rows.reshape(teacher_logp.shape[:-1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha:g})"


class SkewKL(_Skew):
    """``skew_kl``: the skew KL divergence of DistiLLM (Ko et al. 2024, eq. 2),
    ``KL(p || alpha p + (1 - alpha) q)``; ``0 <= alpha < 1``, default 0.1;
    ``alpha = 0`` is ``kl``. Bounded by ``-log alpha`` for ``alpha > 0``.
    DistiLLM's code reports the cross-entropy form ``-sum p log m`` (this value
    plus the teacher's entropy); the gradients with respect to the student agree."""

    reverse = False


class SkewReverseKL(_Skew):
    """``skew_rkl``: the skew reverse KL of DistiLLM, ``KL(q || alpha q + (1 - alpha) p)``;
    ``0 <= alpha < 1``, default 0.1; ``alpha = 0`` is ``rkl``."""

    reverse = True


class _TVDFromLogits(torch.autograd.Function):
    """``0.5 sum_k |p_k - q_k|`` per row with ``p = softmax(z_t)``, ``q = softmax(z_s)``,
    in probability space (no log-probabilities to exponentiate again). With
    ``s = sign(p - q) / 2`` (0 where ``p = q``), ``dV/dp = s`` and ``dV/dq = -s``;
    through the softmaxes ``dV/dz_t = p (s - <p, s>)`` and ``dV/dz_s = -q (s - <q, s>)``.
    Columns at ``-inf`` have ``p = q = 0``: no value, no gradient."""

    @staticmethod
    def forward(ctx, teacher: Tensor, student: Tensor) -> Tensor:
        p = torch.softmax(teacher, dim=-1)
        q = torch.softmax(student, dim=-1)
        diff = p - q
        value = diff.abs().sum(-1).mul_(0.5)
        sign = diff.sign_().mul_(0.5)
        ctx.save_for_backward(p if ctx.needs_input_grad[0] else None, q if ctx.needs_input_grad[1] else None,
                              sign)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        p, q, sign = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        grad_t = grad_s = None
        if p is not None:
            grad_t = (sign - (p * sign).sum(-1, keepdim=True)).mul_(p).mul_(g)
        if q is not None:
            grad_s = (sign - (q * sign).sum(-1, keepdim=True)).mul_(q).mul_(g).neg_()
        return grad_t, grad_s


class TotalVariation:
    """``tvd``: the total variation distance ``0.5 sum_k |p_k - q_k|`` (in [0, 1]).
    ``kd`` calls :meth:`from_logits`, which works in probability space."""

    def __call__(self, teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
        lp, lq = _rows(teacher_logp, student_logp)
        return _BlockwiseRows.apply(lp, lq, _tvd_kernel).reshape(teacher_logp.shape[:-1])

    def from_logits(self, teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
        """The same value per row from logits: ``tvd(log_softmax(z_t), log_softmax(z_s))``."""
        zt, zs = _rows(teacher_logits, student_logits)
        return _TVDFromLogits.apply(zt, zs).reshape(teacher_logits.shape[:-1])

    def __repr__(self) -> str:
        return "TotalVariation()"


class AdaptiveKL:
    """``akl``: adaptive KL (Wu et al. 2024, "Rethinking Kullback-Leibler Divergence
    in Knowledge Distillation for Large Language Models"; following the authors'
    code, LLM_KD_AKL/AKL.py ``get_ratio``):
    ``AKL = g_head / g * KL(p || q) + g_tail / g * KL(q || p)``, ``g = g_head + g_tail``,
    the weights from :func:`akl_weights` (head: the teacher's top class and every
    class whose descending cumulative mass, itself included, is ``<= mu``), carrying
    no gradient, and 0 where ``p = q``. ``mu`` in [0, 1], default 0.5.

    DSKD's re-implementation (``compute_adaptive_kl_divergence``) sorts ascending
    and puts in the tail the classes whose cumulative mass from the bottom is
    ``< alpha``: the class at which the descending cumulative mass first exceeds
    ``mu`` is in the tail here and in the head there (with ``alpha = 1 - mu``).

    Terms weighted by a zero probability are 0; a class that one model gives
    probability 0 and the other does not makes the corresponding KL infinite,
    as it is.
    """

    def __init__(self, mu: float = 0.5):
        self.mu = params.in_range("mu", mu, 0.0, 1.0, closed_high=True)

    def __call__(self, teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
        w_head, w_tail = akl_weights(teacher_logp, student_logp, self.mu)
        return akl_rows(teacher_logp, student_logp, w_head, w_tail)

    def __repr__(self) -> str:
        return f"AdaptiveKL(mu={self.mu:g})"
