"""The proxy teacher of PTLoss (PTLoss paper sec. 4.2, eq. 10, appendix A.3).

For a teacher row ``p`` and coefficients ``eps`` the proxy teacher is the
distribution a student trained with PTLoss converges to,

    p_px = argmin_q  l_PT(p, q) = KL(p || q) + sum_c p_c P_c(1 - q_c),

so that ``KL(p_px || q)`` and ``l_PT(p, q)`` share their minimiser. The paper
solves the stationarity equations with ``scipy.optimize.fsolve`` one sample at
a time; here every row (and, in the coefficient search, every draw) is solved
at once by a damped Newton method in float64.

Solver. Write ``y = log q`` (normalised logits) and ``G(y) = sum_c p_c
[-y_c + P_c(1 - e^{y_c})]`` (``l_PT`` up to a constant). In logit space the
Hessian of ``f(z) = G(z - logsumexp z)`` restricted to the gauge-fixing plane
``{d : q . d = 0}`` is *diagonal*: ``d^T H d = sum_c q_c W_c d_c^2`` with

    W_c = (1 + B) + p_c (q_c P_c''(r_c) - P_c'(r_c)),   r_c = 1 - q_c,
    B = sum_c p_c q_c P_c'(r_c),

and the gradient is ``g_c = q_c g~_c`` with
``g~_c = (1 + B) - (p_c / q_c)(1 + q_c P_c'(r_c))``. The exact Newton step on
that plane is ``d_c = -(g~_c + mu) / W_c`` with ``mu`` such that
``sum_c q_c d_c = 0``: O(C) per row, no linear solve. Every quantity is a
ratio (``p_c / q_c = exp(log p_c - y_c)``), so classes whose probability
underflows are solved as accurately as the others. Where the restricted
Hessian is not positive definite (possible for negative ``eps``), ``W`` is
replaced by ``max(|W|, floor)`` (a descent direction); an Armijo backtracking
line search on ``l_PT`` makes the method globally convergent to a local
minimum, which near it is plain Newton (quadratic convergence). Classes with
``p_c = 0`` keep ``q_c = 0``. With ``eps = 0`` the start, ``q = p``, is the
solution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import torch
from torch import Tensor

from kdcore_ptloss.coefficients import parse_eps, per_class
from kdcore_ptloss.functional import derivative, horner, polynomial

#: floor of the modified curvature where the restricted Hessian is indefinite
CURVATURE_FLOOR = 1e-2
#: largest step (in logit units) tried by the line search
MAX_STEP = 10.0
ARMIJO = 1e-4
#: stand-in for log 0 (classes with p_c = 0): finite, so no inf - inf
DEAD = -1e300
#: rows are solved in blocks of about this many entries (rows x classes),
#: small enough to stay in cache
BLOCK = 1 << 14


@attrs.frozen
class SolveInfo:
    """How the Newton solve went: per-row convergence and the most iterations
    any row needed."""

    converged: Tensor
    iterations: int


class _Block:
    """One block of rows in class-major layout: ``logp [C, n]`` and the
    coefficients of ``P``, ``P'`` and ``P''`` stacked as ``[K, C, n]`` (or
    ``[K, C, 1]`` when shared by every row)."""

    def __init__(self, logp: Tensor, eps: Tensor):
        self.live = None if bool((logp > DEAD).all()) else (logp > DEAD).to(logp.dtype)
        self.logp, self.p = logp, logp.exp()
        coeffs = list(eps.unbind(0))
        self.eps = eps
        self.eps1 = torch.stack(derivative(coeffs, 1)) if coeffs else eps
        self.eps2 = torch.stack(derivative(coeffs, 2)) if len(coeffs) > 1 else eps[:0]

    def select(self, keep: Tensor) -> _Block:
        """The rows where ``keep`` is true."""
        idx = keep.nonzero().squeeze(1)
        out = object.__new__(_Block)
        out.live = None if self.live is None else self.live.index_select(1, idx)
        out.logp, out.p = self.logp.index_select(1, idx), self.p.index_select(1, idx)
        for name in ("eps", "eps1", "eps2"):
            t = getattr(self, name)
            setattr(out, name, t.index_select(2, idx) if t.shape[2] > 1 else t)
        return out

    def objective(self, y: Tensor) -> Tensor:
        """``l_PT(p, q)`` per row for ``y = log q`` (normalised)."""
        return (self.p * (self.logp - y + polynomial(self.eps.unbind(0), -torch.expm1(y)))).sum(0)

    def direction(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Newton step on the plane ``q . d = 0`` and the slope ``g . d``."""
        q = y.exp()
        r = -torch.expm1(y)
        d1, d2 = horner(self.eps1.unbind(0), r), horner(self.eps2.unbind(0), r)
        one_b = 1.0 + (self.p * q * d1).sum(0)
        g = one_b - torch.exp(self.logp - y) * (1.0 + q * d1)
        w = one_b + self.p * (q * d2 - d1)
        if self.live is not None:
            w = w * self.live + (1.0 - self.live)
        # exact Newton where the Hessian on the plane is positive definite:
        # all W_c > 0, or exactly one W_c < 0 with sum_c q_c / W_c < 0
        negative = (w <= 0).sum(0)
        definite = (negative == 0) | ((negative == 1) & ((q / w).sum(0) < 0))
        w = torch.where(definite, w, w.abs().clamp(min=CURVATURE_FLOOR))
        qw = q / w
        mu = (qw * g).sum(0) / qw.sum(0)
        d = (mu - g) / w
        if self.live is not None:
            d = d * self.live
        return d, (q * g * d).sum(0)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch CPU ops on one thread: the solver's ops are small, and
    intra-op threads only add synchronisation (costly on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _normalise(y: Tensor) -> Tensor:
    top = y.amax(0)
    return y - (top + torch.exp(y - top).sum(0).log())


def _solve_block(block: _Block, tol: float, max_iter: int, max_halvings: int) -> tuple[Tensor, Tensor, int]:
    y = block.logp.clone()
    converged = torch.zeros(y.shape[1], dtype=torch.bool)
    active = torch.arange(y.shape[1])
    part, iterations = block, 0
    while active.numel() and iterations < max_iter:
        iterations += 1
        ya = y[:, active]
        d, slope = part.direction(ya)
        size = d.abs().amax(0)
        scale = MAX_STEP / size.clamp(min=MAX_STEP)
        d, slope = d * scale, slope * scale
        f0 = part.objective(ya)
        bound = f0 + 1e-13 * (1.0 + f0.abs())
        step = torch.ones_like(f0)
        pending = torch.ones_like(converged[active])
        for _ in range(max_halvings):
            trial = _normalise(ya + step * d)
            ok = pending & (part.objective(trial) <= bound + ARMIJO * step * slope)
            ya = torch.where(ok, trial, ya)
            pending &= ~ok
            if not pending.any():
                break
            step = torch.where(pending, 0.5 * step, step)
        y[:, active] = ya
        small = size <= tol
        converged[active[small]] = True
        keep = ~(small | pending)
        if not keep.all():
            active, part = active[keep], part.select(keep)
    return y, converged, iterations


def solve(teacher_logp: Tensor, eps: Tensor, draw: Tensor | None = None, *, tol: float = 1e-9,
          max_iter: int = 100, max_halvings: int = 40,
          progress: Callable[[int], None] | None = None) -> tuple[Tensor, SolveInfo]:
    """Proxy-teacher log-probabilities of every row of ``teacher_logp [R, C]``.

    ``eps`` is ``[C, M]`` (same coefficients for every row) or ``[D, C, M]``
    with ``draw [R]`` giving each row's table. Works in float64 on the CPU
    in blocks of rows small enough to stay in cache, and returns float64
    ``[R, C]`` normalised log-probabilities (``-inf`` where the teacher has
    probability 0) on the input's device. ``progress(n)`` is called after
    each block with its number of rows.
    """
    device = teacher_logp.device
    logp = torch.log_softmax(teacher_logp.detach().to("cpu", torch.float64), dim=-1)
    dead = torch.isneginf(logp)
    logp = logp.masked_fill(dead, DEAD)
    eps = eps.detach().to("cpu", torch.float64)
    rows, classes = logp.shape
    size = max(1, BLOCK // max(classes, 1))
    out = torch.empty_like(logp)
    converged = torch.zeros(rows, dtype=torch.bool)
    iterations = 0
    with single_threaded():
        for start in range(0, rows, size):
            sl = slice(start, start + size)
            if draw is None:
                table = eps.permute(1, 0).unsqueeze(-1)                    # [M, C, 1]
            else:
                table = eps[draw[sl].cpu()].permute(2, 1, 0).contiguous()  # [M, C, n]
            block = _Block(logp[sl].T.contiguous(), table)
            y, ok, its = _solve_block(block, tol, max_iter, max_halvings)
            out[sl], converged[sl] = y.T, ok
            iterations = max(iterations, its)
            if progress is not None:
                progress(y.shape[1])
    out = out.masked_fill(dead, float("-inf"))
    return out.to(device), SolveInfo(converged=converged.to(device), iterations=iterations)


def proxy_teacher(teacher_logp: Tensor, eps: Any, *, tol: float = 1e-9, max_iter: int = 100) -> Tensor:
    """The proxy teacher of PTLoss paper sec. 4.2: per row ``argmin_q l_PT(p, q)``.

    ``teacher_logp``: teacher log-probabilities ``[..., C]`` (logits are
    accepted: rows are normalised first); ``eps``: a list of ``M`` numbers or
    a ``C x M`` table. Returns log-probabilities of the same shape and dtype
    (computed in float64, no gradient). ``eps = 0`` returns ``p``.
    """
    table = per_class(parse_eps(eps), teacher_logp.shape[-1])
    with torch.no_grad():
        rows = teacher_logp.detach().reshape(-1, teacher_logp.shape[-1])
        y, _ = solve(rows, table, tol=tol, max_iter=max_iter)
    return y.to(teacher_logp.dtype).reshape(teacher_logp.shape)


class ProxyTeacher:
    """``ptloss_proxy``: replace the teacher by its PTLoss proxy teacher for
    coefficients ``eps`` (PTLoss paper sec. 4.2), so that e.g. ``kd`` with this
    transform trains towards the same minimiser as ``ptloss`` with ``eps``."""

    def __init__(self, eps: Any = (0.0,)):
        self.eps = parse_eps(eps)

    def __call__(self, teacher_logp: Tensor, target: Tensor | None = None) -> Tensor:
        return proxy_teacher(teacher_logp, self.eps)

    def __repr__(self) -> str:
        return f"ProxyTeacher(eps={self.eps.tolist()})"
