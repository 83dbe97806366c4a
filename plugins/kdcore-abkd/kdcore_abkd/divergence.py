"""The alpha-beta divergence of ABKD (ABKD paper def. 4.1; appendix B eq. 8).

``D_AB^(a,b)(p || q) = -1/(a b) sum_k [p^a q^b - a/s p^s - b/s q^s]`` with
``s = a + b``, and its continuous extension (eq. 8) to ``a = 0``, ``b = 0``,
``s = 0``. One form covers every ``(a, b)`` (methods.md): with
``d = log q - log p``, ``E(x) = expm1(x) / x`` and ``E[x1, x2]`` its divided
difference,

    D_AB = sum_k f_k,    f_k = p_k^s d_k^2 E[b d_k, s d_k].

``f`` is evaluated in two regimes, with no case analysis on the singular lines:

* near ``d = 0`` (``|d| * max(|a|, |b|, |s|) < TAU``) by the power series
  ``E[b d, s d] = sum_k h_k(b, s) d^k / (k + 2)!`` (``h_k`` the complete
  homogeneous symmetric polynomial): a polynomial in ``d`` whose coefficients
  are computed once per ``(a, b)``;
* elsewhere by one of three exact identities,

      s f = G_p + G_q,    a f = G_p + Q,    b f = G_q - Q,
      G_q = df/dlog q = (q^s - p^a q^b) / a,   G_p = df/dlog p = (p^s - p^a q^b) / b,
      Q = (q^s - p^s) / s,

  the one whose divisor is the largest of ``|a|, |b|, |s|`` (so nothing small
  is divided by anything small), each difference ``(e^l1 - e^l0) / c`` with
  ``l1 - l0 = c d`` being computed as ``exp(max(l0, l1)) sign(d) (1 - e^-|c d|) / |c|``
  (``exp(l0) d`` for ``c = 0``): exact to rounding, continuous in ``c`` through
  0, and never overflowing when ``alpha, beta >= 0``.

``G_q`` and ``G_p`` are the gradients too, so backward is one multiplication.
Rows are processed in cache-sized blocks with the intermediates updated in
place.

Zero probabilities (``-inf`` log-probabilities: padded vocabulary columns, the
masked target class of DKD's non-target distribution): a term with
``p_k = q_k = 0`` is exactly 0. A term with only one of them 0 is its limit
where the limit is finite (``p_k = 0``: ``q^s / (a s)`` for ``a, s > 0``;
``q_k = 0``: ``p^s / (b s)`` for ``b, s > 0``); where it is infinite (an exponent
``<= 0``, e.g. KL with ``q_k = 0 < p_k``) the term is left out: the sum runs
over the common support. Values and gradients are finite for every input when
``alpha, beta >= 0``, except that the value of ``(0, 0)``, ``sum (log p - log q)^2 / 2``,
leaves the float32 range once ``|log p - log q|`` exceeds about ``2.6e19 / sqrt(C)`` (its
gradients stay finite); with a negative exponent a term whose exact value exceeds
the float range is ``inf``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdcore.common import params
from kdcore.losses.functional import exp

#: stand-in for ``log 0``: finite, so that no ``inf - inf`` arises
LOG_ZERO = -1e30
#: bound on ``|alpha|``, ``|beta|`` (keeps ``alpha * LOG_ZERO`` finite)
MAX_EXPONENT = 1e3
#: exponents (and ``alpha + beta``) smaller than this in magnitude are taken as 0:
#: the divergence moves by O(exponent), far below float precision, and ``1 / c``
#: stays finite
TINY_EXPONENT = 1e-12
#: the series is used where ``|d| * max(|a|, |b|, |a + b|) < TAU``
TAU = 0.25
#: elements per block (a dozen block-sized temporaries stay in the L2/L3 cache)
BLOCK = 1 << 17


def series_coefficients(b: float, s: float, tol: float) -> list[float]:
    """Coefficients ``c_k = h_k(b, s) / (k + 2)!`` of ``E[b d, s d] = sum_k c_k d^k``,
    as many as make the rest smaller than ``tol * c_0`` where ``|d| max(|b|, |s|) <= TAU``
    (term ``k`` is then at most ``(k + 1) TAU^k / (k + 2)!``)."""
    coef, k = [], 0
    while True:
        coef.append(sum(b ** j * s ** (k - j) for j in range(k + 1)) / math.factorial(k + 2))
        k += 1
        if 2 * (k + 1) * TAU ** k / math.factorial(k + 2) < tol:
            return coef


def _snap(c: float) -> float:
    return 0.0 if abs(c) < TINY_EXPONENT else c


class _Plan:
    """The constants of one ``(alpha, beta)``: which identity is used away from
    ``d = 0``, its scalars, and the series near ``d = 0`` (per dtype).

    The differences are computed scaled, ``U_c = (e^l1 - e^l0) / sigma_c`` with
    ``sigma_c = 2 / |c|`` (1 for ``c = 0``), and ``f = kappa (U_x + lam U_y)``.
    """

    def __init__(self, a: float, b: float):
        a, b = _snap(a), _snap(b)
        s = _snap(a + b)
        self.a, self.b, self.s = a, b, s
        cmax = max(abs(a), abs(b), abs(s))
        self.radius = TAU / cmax if cmax > 0 else math.inf
        self.p_zero_ok = a > 0 and s > 0      # p_k = 0 < q_k has a finite limit
        self.q_zero_ok = b > 0 and s > 0      # q_k = 0 < p_k has a finite limit
        sigma = {c: 2.0 / abs(c) if c != 0 else 1.0 for c in (a, b, s)}
        self.sigma_a, self.sigma_b = sigma[a], sigma[b]
        if cmax == 0:                                 # a = b = 0: f = d^2 / 2
            self.identity, self.kappa, self.lam = "series", 1.0, 0.0
        elif abs(s) >= max(abs(a), abs(b)):           # s f = G_p + G_q
            self.identity, self.kappa, self.lam = "s", sigma[a] / s, -sigma[b] / sigma[a]
        elif abs(a) >= abs(b):                        # a f = G_p + Q
            self.identity, self.kappa, self.lam = "a", sigma[s] / a, -sigma[b] / sigma[s]
        else:                                         # b f = G_q - Q
            self.identity, self.kappa, self.lam = "b", sigma[a] / b, -sigma[s] / sigma[a]
        self._series: dict[torch.dtype, list[float]] = {}

    def series(self, dtype: torch.dtype) -> list[float]:
        """The series coefficients divided by ``kappa``, accurate to ``dtype``."""
        if dtype not in self._series:
            coef = series_coefficients(self.b, self.s, torch.finfo(dtype).eps / 4)
            self._series[dtype] = [c / self.kappa for c in coef]
        return self._series[dtype]


def _scaled_diff(l0: Tensor, l1: Tensor, c: float, d: Tensor, absd: Tensor,
                 out: Tensor | None = None) -> Tensor:
    """``U_c = (e^l1 - e^l0) / sigma_c`` for ``l1 - l0 = c d``:
    ``exp(max(l0, l1)) sign(d) t / (1 + t)`` with ``t = tanh(|c d| / 2)``, since
    ``1 - e^-x = 2 t / (1 + t)`` (accurate for small ``x``, and on CPU much faster
    than ``expm1``); ``exp(l0) d`` when ``c = 0``."""
    if c == 0:
        return exp(l0, out=out).mul_(d)
    t = torch.mul(absd, abs(c) / 2).tanh_()
    t = t.div_(t + 1).copysign_(d)
    m = torch.maximum(l0, l1, out=out)
    return exp(m, out=m).mul_(t)


def _near(d: Tensor, ps: Tensor, coef: list[float]) -> Tensor:
    """``p^s d^2 sum_k coef_k d^k`` by Horner's rule, in place on ``ps``."""
    acc = torch.full_like(d, coef[-1])
    for c in reversed(coef[:-1]):
        acc.mul_(d).add_(c)
    return ps.mul_(acc).mul_(d).mul_(d)


def _block(lp: Tensor, lq: Tensor, plan: _Plan, out_p: Tensor | None, out_q: Tensor | None) -> Tensor:
    """``sum_k f_k / kappa`` for each row of a block; writes the scaled gradients
    ``U_b`` (``G_p = -sigma_b U_b``) into ``out_p`` and ``U_a`` (``G_q = sigma_a U_a``)
    into ``out_q`` when they are given."""
    a, b, s = plan.a, plan.b, plan.s
    lp = lp.clamp(min=LOG_ZERO)
    lq = lq.clamp(min=LOG_ZERO)
    if not (plan.p_zero_ok and plan.q_zero_ok):   # leave out terms whose limit is infinite
        out = torch.zeros_like(lp, dtype=torch.bool)
        if not plan.p_zero_ok:
            out |= lp == LOG_ZERO
        if not plan.q_zero_ok:
            out |= lq == LOG_ZERO
        lp.masked_fill_(out, 0.0)
        lq.masked_fill_(out, 0.0)
    d = lq - lp
    absd = d.abs()
    lm = torch.mul(lq, b).add_(lp, alpha=a)           # log p^a q^b (not s lp + b d: huge
    la = lp.mul_(s)                                   # log p^s      terms could cancel)
    lb = lq.mul_(s)                                   # log q^s
    u_a = _scaled_diff(lm, lb, a, d, absd, out_q)
    u_b = _scaled_diff(la, lm, b, d, absd, out_p)
    if plan.identity == "s":
        far = torch.add(u_a, u_b, alpha=plan.lam)
    elif plan.identity != "series":
        u_s = _scaled_diff(la, lb, s, d, absd)
        far = torch.add(u_s, u_b, alpha=plan.lam) if plan.identity == "a" \
            else torch.add(u_a, u_s, alpha=plan.lam)
    f = _near(d, exp(la, out=la), plan.series(d.dtype))
    if plan.identity != "series":
        f = torch.where(absd < plan.radius, f, far, out=far)
    return f.sum(-1)


class _ABRows(torch.autograd.Function):
    """Per-row ``D_AB`` of ``[n, C]`` log-probabilities, in blocks of rows, with the
    gradients computed alongside (saved, scaled; backward multiplies)."""

    @staticmethod
    def forward(ctx, lp: Tensor, lq: Tensor, plan: _Plan) -> Tensor:
        need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, c = lp.shape
        rows = lp.new_empty(n)
        g_p = torch.empty_like(lp) if need_p else None
        g_q = torch.empty_like(lq) if need_q else None
        step = max(1, BLOCK // max(c, 1))
        for i in range(0, n, step):
            sl = slice(i, i + step)
            rows[sl] = _block(lp[sl], lq[sl], plan, None if g_p is None else g_p[sl],
                              None if g_q is None else g_q[sl])
        ctx.plan = plan
        ctx.save_for_backward(g_p, g_q)
        return rows.mul_(plan.kappa)

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        g_p, g_q = ctx.saved_tensors
        plan = ctx.plan
        grad_p = None if g_p is None else g_p * (grad_rows * -plan.sigma_b).unsqueeze(-1)
        grad_q = None if g_q is None else g_q * (grad_rows * plan.sigma_a).unsqueeze(-1)
        return grad_p, grad_q, None


def exponent(name: str, value: float) -> float:
    """Check an alpha-beta exponent (a finite number, ``|value| <= MAX_EXPONENT``)."""
    return params.in_range(name, value, -MAX_EXPONENT, MAX_EXPONENT, closed_high=True)


class AlphaBetaDivergence:
    """``ab``: the alpha-beta divergence ``D_AB^(alpha, beta)(p || q)`` per row
    (ABKD paper def. 4.1, continuous extension appendix B eq. 8), evaluated in the
    single stable form described in the module docstring.

    Special cases (ABKD paper Table 1): ``(1, 0)`` KL(p || q); ``(0, 1)`` KL(q || p);
    ``(1, 1)`` ``sum (p - q)^2 / 2``; ``(0.5, 0.5)`` ``2 sum (sqrt p - sqrt q)^2``
    (4 times the squared Hellinger distance); ``alpha + beta = 1`` the alpha
    divergence. Defaults are the paper's CIFAR-100 pair (0.8, 0.3).
    """

    def __init__(self, alpha: float = 0.8, beta: float = 0.3):
        self.alpha = exponent("alpha", alpha)
        self.beta = exponent("beta", beta)
        self._plan = _Plan(self.alpha, self.beta)

    def __call__(self, teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
        if teacher_logp.shape != student_logp.shape:
            raise ValueError(f"teacher {tuple(teacher_logp.shape)} and student "
                             f"{tuple(student_logp.shape)} log-probabilities differ in shape")
        dtype = torch.promote_types(torch.promote_types(teacher_logp.dtype, student_logp.dtype),
                                    torch.float32)
        c = teacher_logp.shape[-1]
        lp = teacher_logp.to(dtype).reshape(-1, c).contiguous()
        lq = student_logp.to(dtype).reshape(-1, c).contiguous()
        return _ABRows.apply(lp, lq, self._plan).reshape(teacher_logp.shape[:-1])

    def __repr__(self) -> str:
        return f"AlphaBetaDivergence(alpha={self.alpha:g}, beta={self.beta:g})"
