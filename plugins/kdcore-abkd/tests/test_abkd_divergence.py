"""The ``ab`` divergence against independent references: appendix B eq. 8 branch
by branch in float64, and def. 4.1 in mpmath (50 digits) near the singular lines."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import mpmath
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import kdcore
from kdcore.testing import check_divergence
from kdcore_abkd import AlphaBetaDivergence


def eq8_terms(p: torch.Tensor, q: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """ABKD paper eq. 8 elementwise on float64 probabilities, on the common support,
    plus the finite one-sided limits (the documented zero-probability convention)."""
    s = a + b
    both = (p > 0) & (q > 0)
    p1, q1 = torch.where(both, p, 1.0), torch.where(both, q, 1.0)
    log = torch.log
    if a != 0 and b != 0 and s != 0:
        t = -(p1 ** a * q1 ** b - a / s * p1 ** s - b / s * q1 ** s) / (a * b)
    elif b == 0 and a != 0:
        t = (p1 ** a * (log(p1 ** a) - log(q1 ** a)) - p1 ** a + q1 ** a) / a ** 2
    elif s == 0 and a != 0:
        t = (log(q1 ** a) - log(p1 ** a) + (q1 ** a / p1 ** a) ** -1 - 1) / a ** 2
    elif a == 0 and b != 0:
        t = (q1 ** b * (log(q1 ** b) - log(p1 ** b)) - q1 ** b + p1 ** b) / b ** 2
    else:
        t = 0.5 * (log(p1) - log(q1)) ** 2
    t = torch.where(both, t, 0.0)
    if a > 0 and s > 0:
        t = t + torch.where((p == 0) & (q > 0), q ** s / (a * s), 0.0)
    if b > 0 and s > 0:
        t = t + torch.where((q == 0) & (p > 0), p ** s / (b * s), 0.0)
    return t


def eq8_rows(lp: torch.Tensor, lq: torch.Tensor, a: float, b: float) -> torch.Tensor:
    return eq8_terms(lp.double().exp(), lq.double().exp(), a, b).sum(-1)


def mp_term(lp: float, lq: float, a: float, b: float) -> mpmath.mpf:
    """Def. 4.1 (or eq. 8 on an exactly singular line) in 50-digit arithmetic."""
    with mpmath.workdps(50):
        lp, lq, a, b = (mpmath.mpf(x) for x in (lp, lq, a, b))
        p, q, s = mpmath.exp(lp), mpmath.exp(lq), a + b
        if a != 0 and b != 0 and s != 0:
            return -(p ** a * q ** b - a / s * p ** s - b / s * q ** s) / (a * b)
        if a == 0 and b == 0:
            return (lp - lq) ** 2 / 2
        if b == 0:
            return (p ** a * (a * lp - a * lq) - p ** a + q ** a) / a ** 2
        if a == 0:
            return (q ** b * (b * lq - b * lp) - q ** b + p ** b) / b ** 2
        return (a * lq - a * lp + mpmath.exp(a * lp - a * lq) - 1) / a ** 2


def mp_rows(lp: torch.Tensor, lq: torch.Tensor, a: float, b: float) -> torch.Tensor:
    return torch.tensor([float(sum(mp_term(x, y, a, b) for x, y in zip(rp, rq)))
                         for rp, rq in zip(lp.tolist(), lq.tolist())], dtype=torch.float64)


def pair(n: int, c: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student float32 log-probabilities; the student's rows range from
    nearly equal to the teacher's to far from it."""
    g = torch.Generator().manual_seed(seed)
    zt = 3 * torch.randn(n, c, generator=g)
    scale = torch.logspace(-4, 0, n)[:, None] * spread
    zs = zt + scale * torch.randn(n, c, generator=g)
    return torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)


PAIRS = [(0.8, 0.3), (0.2, 0.7), (0.5, 0.5), (1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0),
         (2.0, 0.0), (0.0, 0.5), (0.5, -0.5), (-1.0, 1.0), (1.5, -0.5), (-0.3, 0.9), (0.6, -0.3),
         (1.2, -0.2), (3.0, 2.0)]


@pytest.mark.parametrize("a,b", PAIRS)
def test_matches_eq8_float64(a, b):
    lp, lq = pair(12, 40, 6.0, seed=1)
    got = kdcore.create("divergence", "ab", alpha=a, beta=b)(lp, lq)
    assert got.dtype == torch.float32 and got.shape == (12,)
    torch.testing.assert_close(got.double(), eq8_rows(lp, lq, a, b), rtol=4e-6, atol=1e-12)


@pytest.mark.parametrize("a,b", [(0.8, 0.3), (0.0, 1.0), (1.0, 0.0), (0.5, -0.5), (1.5, -0.5), (0.0, 0.0)])
def test_gradients_match_eq8_float64(a, b):
    lp, lq = pair(6, 30, 4.0, seed=2)
    lp32, lq32 = lp.clone().requires_grad_(), lq.clone().requires_grad_()
    w = torch.linspace(0.5, 2.0, 6)
    (AlphaBetaDivergence(a, b)(lp32, lq32) * w).sum().backward()
    lp64, lq64 = lp.double().requires_grad_(), lq.double().requires_grad_()
    (eq8_terms(lp64.exp(), lq64.exp(), a, b).sum(-1) * w.double()).sum().backward()
    torch.testing.assert_close(lq32.grad.double(), lq64.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(lp32.grad.double(), lp64.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("a,b", [(1e-6, 0.7), (-1e-6, 0.7), (0.8, 1e-6), (0.8, -1e-6),
                                 (1.0, -1.0 + 1e-6), (1.0, -1.0 - 1e-6), (1e-6, 1e-6),
                                 (1e-6, -2e-6), (3e-4, 1e-5), (0.1, -0.1 + 1e-5)])
def test_near_singular_lines_match_mpmath(a, b):
    lp, lq = pair(6, 16, 4.0, seed=3)
    got = AlphaBetaDivergence(a, b)(lp, lq)
    torch.testing.assert_close(got.double(), mp_rows(lp, lq, a, b), rtol=5e-6, atol=1e-12)


@pytest.mark.parametrize("line", ["a=0", "b=0", "a+b=0", "a=b=0"])
def test_continuous_across_singular_lines(line):
    """Values at distance 1e-6 .. 1e-3 from a singular line converge to eq. 8 on it."""
    lp, lq = pair(5, 20, 3.0, seed=4)
    on = {"a=0": (0.0, 0.7), "b=0": (0.8, 0.0), "a+b=0": (0.6, -0.6), "a=b=0": (0.0, 0.0)}[line]
    step = {"a=0": (1.0, 0.0), "b=0": (0.0, 1.0), "a+b=0": (0.0, 1.0), "a=b=0": (1.0, 1.0)}[line]
    limit = eq8_rows(lp, lq, *on)
    prev = None
    for eps in (1e-3, 1e-4, 1e-5, 1e-6, -1e-6, -1e-4):
        a, b = on[0] + eps * step[0], on[1] + eps * step[1]
        got = AlphaBetaDivergence(a, b)(lp, lq).double()
        err = ((got - limit).abs() / limit).max().item()
        assert err < 20 * abs(eps) + 3e-6, (eps, err)
        if eps > 0 and prev is not None:
            assert err <= prev + 3e-6   # converges as eps -> 0
        prev = err if eps > 0 else prev


def test_special_cases():
    """Table 1 special cases; they hold for normalised distributions, and the float32
    log-probabilities are normalised to about 1e-7, hence the absolute tolerance."""
    g = torch.Generator().manual_seed(5)
    lp, lq = (torch.log_softmax(2 * torch.randn(8, 25, generator=g), -1) for _ in range(2))
    p, q = lp.double().exp(), lq.double().exp()
    cases = {
        (1.0, 0.0): (p * (p.log() - q.log())).sum(-1),                  # KL(p || q)
        (0.0, 1.0): (q * (q.log() - p.log())).sum(-1),                  # KL(q || p)
        (1.0, 1.0): 0.5 * ((p - q) ** 2).sum(-1),                       # squared Euclidean / 2
        (0.5, 0.5): 2.0 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1),         # 4 * squared Hellinger
        (0.0, 0.0): 0.5 * ((p.log() - q.log()) ** 2).sum(-1),
    }
    for (a, b), want in cases.items():
        torch.testing.assert_close(AlphaBetaDivergence(a, b)(lp, lq).double(), want, rtol=4e-6, atol=1e-6)
    torch.testing.assert_close(AlphaBetaDivergence(1.0, 0.0)(lp, lq), kdcore.create("divergence", "kl")(lp, lq),
                               rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(AlphaBetaDivergence(0.0, 1.0)(lp, lq), kdcore.create("divergence", "rkl")(lp, lq),
                               rtol=2e-6, atol=1e-7)


def test_zero_for_equal_distributions_and_nonnegative():
    lp, lq = pair(10, 30, 8.0, seed=6)
    for a, b in PAIRS:
        div = AlphaBetaDivergence(a, b)
        assert torch.equal(div(lp, lp), torch.zeros(10))
        assert (div(lp, lq) >= 0).all()


@pytest.mark.parametrize("a,b", [(0.8, 0.3), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.5, -0.5), (1.5, -0.5)])
def test_padded_columns_contribute_exactly_zero(a, b):
    lp, lq = pair(4, 12, 3.0, seed=7)
    pad = torch.full((4, 5), -math.inf)
    lp_pad = torch.cat([lp, pad], -1).requires_grad_()
    lq_pad = torch.cat([lq, pad], -1).requires_grad_()
    div = AlphaBetaDivergence(a, b)
    value = div(lp_pad, lq_pad)
    torch.testing.assert_close(value, div(lp, lq), rtol=1e-6, atol=0)  # summation order only
    value.sum().backward()
    for g in (lp_pad.grad, lq_pad.grad):
        assert torch.isfinite(g).all() and (g[:, 12:] == 0).all()


def test_one_sided_zeros_follow_the_documented_limits():
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.4, 0.0, 0.6]]))
    lq = torch.log(torch.tensor([[0.2, 0.3, 0.5], [0.3, 0.3, 0.4]]))
    for a, b in [(0.8, 0.3), (1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.5, -0.5), (1.5, -0.5), (-0.5, 1.5)]:
        want = eq8_terms(lp.double().exp(), lq.double().exp(), a, b).sum(-1)
        lq_g = lq.clone().requires_grad_()
        got = AlphaBetaDivergence(a, b)(lp, lq_g)
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-9)
        got.sum().backward()
        assert torch.isfinite(lq_g.grad).all()
    # p = 0 < q with a, a + b > 0: the limit q^s / (a s); KL with q = 0 < p: left out
    row = AlphaBetaDivergence(0.8, 0.3)(lp[:1, 2:], lq[:1, 2:])
    torch.testing.assert_close(row, torch.tensor([0.5 ** 1.1 / (0.8 * 1.1)]))
    assert AlphaBetaDivergence(1.0, 0.0)(lq[1:, 1:2], lp[1:, 1:2]).item() == 0.0


def test_extreme_inputs_are_finite():
    z = torch.tensor([[1e4, 0.0, -1e4, 5.0], [80.0, -80.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    for a, b in [(0.8, 0.3), (0.2, 0.7), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (1e-6, 1e-6)]:
        lp = torch.log_softmax(z, -1).requires_grad_()
        lq = torch.log_softmax(z.flip(-1), -1).requires_grad_()
        value = AlphaBetaDivergence(a, b)(lp, lq)
        value.sum().backward()
        assert torch.isfinite(value).all() and torch.isfinite(lp.grad).all() and torch.isfinite(lq.grad).all()


def test_shapes_dtypes_and_float64_accuracy():
    lp, lq = pair(6, 10, 3.0, seed=8)
    div = AlphaBetaDivergence(0.3, 0.4)
    assert div(lp.reshape(2, 3, 10), lq.reshape(2, 3, 10)).shape == (2, 3)
    assert div(lp.bfloat16(), lq.bfloat16()).dtype == torch.float32
    got = div(lp.double(), lq.double())
    assert got.dtype == torch.float64
    # float64 inputs give float64 accuracy (the naive eq. 8 loses 7 digits on the first row)
    torch.testing.assert_close(got, mp_rows(lp, lq, 0.3, 0.4), rtol=4e-15, atol=0)
    with pytest.raises(ValueError):
        div(lp, lq[:, :5])


def test_parameters_are_validated():
    with pytest.raises(kdcore.ConfigError, match="alpha"):
        kdcore.create("divergence", "ab", alpha="1")
    with pytest.raises(kdcore.ConfigError, match="beta"):
        kdcore.create("divergence", "ab", beta=1e9)
    with pytest.raises(kdcore.ConfigError, match="gamma"):
        kdcore.create("divergence", "ab", gamma=1.0)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["a=0", "b=0", "a+b=0", "a=b=0"]), st.floats(-2.0, 2.0),
       st.sampled_from([1e-6, -1e-6, 1e-5, -3e-5, 1e-4, -1e-3]),
       hnp.arrays(np.float32, (2, 2, 8), elements=st.floats(-8.0, 8.0, width=32)))
def test_near_singular_lines_random(line, x, eps, z):
    """Random points at distance 1e-6 .. 1e-3 from a singular line, random rows:
    float32 agrees with def. 4.1 evaluated in 50 digits."""
    a, b = {"a=0": (eps, x), "b=0": (x, eps), "a+b=0": (x, -x + eps), "a=b=0": (eps, -0.5 * eps)}[line]
    assume(abs(a) > 1e-7 and abs(b) > 1e-7 and abs(a + b) > 1e-7)
    lp, lq = torch.log_softmax(torch.from_numpy(z[0]), -1), torch.log_softmax(torch.from_numpy(z[1]), -1)
    got = AlphaBetaDivergence(a, b)(lp, lq)
    torch.testing.assert_close(got.double(), mp_rows(lp, lq, a, b), rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("a,b", [(0.8, 0.3), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.5, -0.5), (1.5, -0.5), (3.0, 2.0)])
def test_follows_the_divergence_conventions(a, b):
    """kdcore.testing: per row on [N, C] and [B, T, C], D(p || p) = 0, >= 0, -inf columns."""
    check_divergence(kdcore.create("divergence", "ab", alpha=a, beta=b))
