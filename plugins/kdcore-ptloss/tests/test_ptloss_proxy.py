"""The proxy teacher (PTLoss paper sec. 4.2, eq. 10) and the ``ptloss_proxy`` transform."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

import kdcore
from kdcore_ptloss import proxy_teacher
from kdcore_ptloss.proxy import _Block, solve

kdcore.reload_plugins()


def l_pt(z, p, eps):
    """l_PT(p, softmax(z)) in plain numpy float64 (eq. 7); ``eps`` is C x M."""
    z = z - z.max()
    logq = z - np.log(np.exp(z).sum())
    q = np.exp(logq)
    m = np.arange(1, eps.shape[1] + 1)
    keep = p > 0
    kl = np.sum(p[keep] * (np.log(p[keep]) - logq[keep]))
    return kl + np.sum(p * np.sum(eps * (1.0 - q)[:, None] ** m, axis=1))


def kl_to(z, target):
    z = z - z.max()
    logq = z - np.log(np.exp(z).sum())
    keep = target > 0
    return np.sum(target[keep] * (np.log(target[keep]) - logq[keep]))


def scipy_argmin(fun, c, start):
    """Minimise over the C - 1 free logits (the last fixed at 0) with BFGS."""
    res = minimize(lambda v: fun(np.append(v, 0.0)), start[:-1] - start[-1], method="BFGS",
                   options={"gtol": 1e-11, "maxiter": 10000})
    z = np.append(res.x, 0.0)
    return np.exp(z - z.max()) / np.exp(z - z.max()).sum()


def test_zero_eps_gives_teacher():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(50, 6, generator=g) * 4, -1)
    torch.testing.assert_close(proxy_teacher(logp, [0.0, 0.0]), logp, rtol=0, atol=1e-6)
    logits = torch.randn(3, 4, 6, generator=g)
    out = proxy_teacher(logits, [0.0])
    assert out.shape == logits.shape and out.dtype == logits.dtype
    torch.testing.assert_close(out, torch.log_softmax(logits, -1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_against_scipy(seed):
    rng = np.random.default_rng(seed)
    c, m = int(rng.integers(2, 6)), int(rng.integers(1, 5))
    eps = rng.uniform(-0.5, 3.0, size=(c, m))
    logits = rng.normal(size=(5, c)) * 2.0
    got = proxy_teacher(torch.tensor(logits, dtype=torch.float64), torch.tensor(eps)).exp().numpy()
    for row, z in enumerate(logits):
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        want = scipy_argmin(lambda v: l_pt(v, p, eps), c, np.log(p))
        np.testing.assert_allclose(got[row], want, atol=1e-6)


@pytest.mark.parametrize("eps", [[2.0], [1.0, -0.8, 3.0], [[4.0, 1.0], [-1.0, 0.5], [0.0, 6.0]]])
def test_same_minimiser_as_ptloss(eps):
    """KL against the proxy teacher and PTLoss against the teacher have the same
    minimiser over the student's free logits."""
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(4, 3, generator=g, dtype=torch.float64) * 2, -1)
    proxy = proxy_teacher(logp, eps).exp().numpy()
    table = np.array(eps if isinstance(eps[0], list) else [eps] * 3, dtype=np.float64)
    for row in range(4):
        p = logp[row].exp().numpy()
        start = np.zeros(3)
        a = scipy_argmin(lambda v: l_pt(v, p, table), 3, start)
        b = scipy_argmin(lambda v: kl_to(v, proxy[row]), 3, start)
        np.testing.assert_allclose(a, b, atol=1e-6)
        np.testing.assert_allclose(a, proxy[row], atol=1e-6)


def test_components_train_to_the_same_student():
    """Gradient descent on student logits with ``ptloss`` and with ``kd`` on the
    ``ptloss_proxy`` teacher ends at the same student."""
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(8, 5, generator=g) * 2
    eps = [3.0, -0.5]
    losses = [kdcore.create("loss", "ptloss", eps=eps),
              kdcore.create("loss", "kd", temperature=1.0, transforms=[{"name": "ptloss_proxy", "eps": eps}])]
    students = []
    for loss in losses:
        z = torch.zeros(8, 5, dtype=torch.float32, requires_grad=True)
        opt = torch.optim.LBFGS([z], lr=1, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")
        opt.step(lambda: (opt.zero_grad(), (v := loss(z, teacher) * 8), v.backward(), v)[-1])
        students.append(torch.softmax(z.detach(), -1))
    torch.testing.assert_close(students[0], students[1], rtol=0, atol=2e-4)


def gradient_and_hessian(logp, z, eps):
    """Autograd gradient and Hessian of l_PT(p, softmax(z)) for one row."""
    m = torch.arange(1, eps.shape[1] + 1, dtype=torch.float64)

    def f(v):
        logq = torch.log_softmax(v, -1)
        return (logp.exp() * (logp - logq)).sum() + (logp.exp() * (eps * (1 - logq.exp())[:, None] ** m).sum(1)).sum()

    return torch.autograd.functional.jacobian(f, z), torch.autograd.functional.hessian(f, z)


def test_newton_step_is_exact_on_the_gauge_plane():
    """The O(C) step equals the Newton step from the full Hessian, with the
    gauge fixed by q . d = 0 (bordered system), where that Hessian is definite."""
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        c = 4
        logp = torch.log_softmax(torch.randn(c, generator=g, dtype=torch.float64) * 2, -1)
        y = torch.log_softmax(logp + 0.3 * torch.randn(c, generator=g, dtype=torch.float64), -1)
        eps = torch.rand(c, 3, generator=g, dtype=torch.float64) * 2
        block = _Block(logp[:, None].clone(), eps.T[:, :, None].clone())
        d, slope = block.direction(y[:, None].clone())
        grad, hess = gradient_and_hessian(logp, y, eps)
        q = y.exp()
        bordered = torch.zeros(c + 1, c + 1, dtype=torch.float64)
        bordered[:c, :c], bordered[:c, c], bordered[c, :c] = hess, q, q
        want = torch.linalg.solve(bordered, torch.cat([-grad, torch.zeros(1, dtype=torch.float64)]))[:c]
        assert torch.linalg.eigvalsh(hess + torch.outer(q, q)).min() > 0
        torch.testing.assert_close(d[:, 0], want, rtol=1e-8, atol=1e-10)
        assert slope.item() == pytest.approx(float(grad @ want), rel=1e-8)


def test_stationary_for_wide_coefficients_and_extreme_teachers():
    g = torch.Generator().manual_seed(4)
    c = 5
    logits = torch.randn(200, c, generator=g, dtype=torch.float64) * torch.tensor([0.5, 3.0, 10.0, 30.0])[
        torch.randint(0, 4, (200, 1), generator=g)]
    eps = -1.0 + 11.0 * torch.rand(200, c, 5, generator=g, dtype=torch.float64)
    out, info = solve(logits, eps, torch.arange(200))
    assert info.converged.all()
    for row in range(0, 200, 7):
        grad, _ = gradient_and_hessian(torch.log_softmax(logits[row], -1), out[row], eps[row])
        assert grad.abs().max() < 1e-10


def test_padded_and_underflowing_classes():
    inf = float("inf")
    logp = torch.log_softmax(torch.tensor([[0.0, -800.0, -3.0, -inf], [5.0, 0.0, -inf, -inf]],
                                          dtype=torch.float64), -1)
    out = proxy_teacher(logp, [2.0, 1.0])
    assert torch.isneginf(out[0, 3]) and torch.isneginf(out[1, 2:]).all()
    assert torch.isfinite(out[0, :3]).all() and torch.isfinite(out[1, :2]).all()
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, dtype=torch.float64))
    # a class whose probability underflows still satisfies the stationarity
    # condition q_c (1 + B) = p_c (1 + q_c P'(1 - q_c)), i.e. log q_c = log p_c - log(1 + B)
    q, p = out[0].exp(), logp[0].exp()
    one_b = 1 + (p * q * (2.0 + 2 * 1.0 * (1 - q))).nan_to_num().sum()
    assert out[0, 1].item() == pytest.approx(logp[0, 1].item() - torch.log(one_b).item(), rel=1e-12)


def test_float32_single_class_rows():
    logits = torch.tensor([[3.0, float("-inf"), float("-inf")]])
    out = proxy_teacher(logits, [5.0])
    assert out[0, 0].item() == 0.0 and out.dtype == torch.float32


def test_transform_registered():
    transform = kdcore.create("transform", "ptloss_proxy", eps=[1.0, 2.0])
    logp = torch.log_softmax(torch.randn(4, 3), -1)
    torch.testing.assert_close(transform(logp, None), proxy_teacher(logp, [1.0, 2.0]))
    with pytest.raises(kdcore.ConfigError, match="eps"):
        kdcore.create("transform", "ptloss_proxy", eps="big")


finite32 = st.floats(-3e4, 3e4, allow_nan=False, width=32)


@st.composite
def extreme_teachers(draw):
    n, c = draw(st.integers(1, 4)), draw(st.integers(2, 6))
    values = st.one_of(finite32, st.sampled_from([0.0, 80.0, -80.0, 1e4, -1e4]))
    logits = torch.tensor(draw(st.lists(values, min_size=n * c, max_size=n * c))).reshape(n, c)
    pad = draw(st.lists(st.booleans(), min_size=c, max_size=c))
    pad[draw(st.integers(0, c - 1))] = False  # at least one real class
    logits[:, torch.tensor(pad)] = float("-inf")
    m = draw(st.integers(1, 5))
    coef = st.floats(-1.0, 10.0, allow_nan=False)
    eps = ([draw(st.lists(coef, min_size=m, max_size=m)) for _ in range(c)] if draw(st.booleans())
           else draw(st.lists(coef, min_size=m, max_size=m)))
    return logits, eps


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extreme_teachers())
def test_proxy_finite_on_extreme_teachers(batch):
    """Huge float32 logits, padded -inf columns, coefficients from the whole
    search space [-1, 10] (shared or C x M): a normalised, finite proxy that
    keeps the padded columns at -inf; every row converges unless a
    first-order coefficient is at -1 (the degenerate edge, see the docs)."""
    logits, eps = batch
    out = proxy_teacher(logits, eps)
    dead = torch.isneginf(logits)
    assert out.dtype == torch.float32
    assert torch.equal(torch.isneginf(out), dead) and torch.isfinite(out[~dead]).all()
    torch.testing.assert_close(out.double().exp().sum(-1), torch.ones(len(out), dtype=torch.float64))
    table = torch.tensor(eps, dtype=torch.float64)
    table = table.expand(logits.shape[-1], -1) if table.dim() == 1 else table
    _, info = solve(logits.double(), table)
    assert info.converged.all() or table[:, 0].min() < -0.999


@pytest.mark.parametrize("seed", range(3))
def test_against_scipy_whole_search_space(seed):
    """Coefficients drawn from the paper's space [-1, 10] (orders up to 5,
    C x M tables), against a plain BFGS solve started from the teacher."""
    rng = np.random.default_rng(10 + seed)
    c, m = int(rng.integers(3, 8)), int(rng.integers(1, 6))
    eps = rng.uniform(-1.0, 10.0, size=(c, m))
    logits = rng.normal(size=(4, c)) * 3.0
    got = proxy_teacher(torch.tensor(logits), torch.tensor(eps)).exp().numpy()
    for row, z in enumerate(logits):
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        want = scipy_argmin(lambda v: l_pt(v, p, eps), c, np.log(p))
        assert l_pt(np.log(got[row]), p, eps) <= l_pt(np.log(want), p, eps) + 1e-12
        np.testing.assert_allclose(got[row], want, atol=1e-6)
