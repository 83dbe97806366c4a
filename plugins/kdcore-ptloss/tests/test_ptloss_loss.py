"""The ``ptloss`` loss (PTLoss paper eq. 7) against a plain float64 reference."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdcore
from kdcore import ConfigError

kdcore.reload_plugins()


def reference(student, teacher, target, eps, temperature):
    """Eq. 7 with Hinton's T^2, row by row in float64 with plain Python maths;
    the mean over rows whose target is not -100."""
    s = student.double().reshape(-1, student.shape[-1]).tolist()
    t = teacher.double().reshape(-1, teacher.shape[-1]).tolist()
    y = [0] * len(s) if target is None else target.reshape(-1).tolist()
    total, count = 0.0, 0
    for zs, zt, label in zip(s, t, y):
        if label == -100:
            continue
        p = softmax_list([v / temperature for v in zt])
        q = softmax_list([v / temperature for v in zs])
        value = 0.0
        for c in range(len(p)):
            if p[c] == 0.0:
                continue
            value += p[c] * (math.log(p[c]) - math.log(q[c]))
            coeffs = eps[c] if isinstance(eps[0], list) else eps
            value += p[c] * sum(e * (1.0 - q[c]) ** (m + 1) for m, e in enumerate(coeffs))
        total += temperature ** 2 * value
        count += 1
    return total / max(count, 1)


def softmax_list(z):
    top = max(z)
    e = [math.exp(v - top) for v in z]
    s = sum(e)
    return [v / s for v in e]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("eps", [[1.0], [2.0, -0.5, 3.0], [[0.5, 1.0], [-1.0, 2.0], [3.0, 0.0], [9.0, -0.3]]])
def test_matches_reference(temperature, eps):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 4, generator=g) * 3, torch.randn(16, 4, generator=g) * 3
    y = torch.randint(0, 4, (16,), generator=g)
    loss = kdcore.create("loss", "ptloss", eps=eps, temperature=temperature)
    assert loss(s, t, y).item() == pytest.approx(reference(s, t, y, eps, temperature), rel=2e-5, abs=1e-6)


def test_token_level_with_ignored_positions():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 5, 6, generator=g) * 2, torch.randn(3, 5, 6, generator=g) * 2
    y = torch.randint(0, 6, (3, 5), generator=g)
    y[0, :2] = -100
    y[2, 4] = -100
    eps = [1.5, 0.5, -0.5]
    loss = kdcore.create("loss", "ptloss", eps=eps, temperature=2.0)
    assert loss(s, t, y).item() == pytest.approx(reference(s, t, y, eps, 2.0), rel=2e-5)
    # ignored positions do not matter, and get no gradient
    s2 = s.clone()
    s2[0, :2] = 1e4
    s2.requires_grad_(True)
    value = loss(s2, t, y)
    value.backward()
    assert value.item() == pytest.approx(loss(s, t, y).item(), rel=1e-6)
    assert (s2.grad[0, :2] == 0).all() and torch.isfinite(s2.grad).all()


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_zero_eps_is_kd(temperature):
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(32, 7, generator=g) * 4).requires_grad_(True)
    t = torch.randn(32, 7, generator=g) * 4
    pt = kdcore.create("loss", "ptloss", eps=[0.0, 0.0, 0.0], temperature=temperature)(s, t)
    (g_pt,) = torch.autograd.grad(pt, s)
    kd = kdcore.create("loss", "kd", temperature=temperature)(s, t)
    (g_kd,) = torch.autograd.grad(kd, s)
    assert pt.item() == pytest.approx(kd.item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(g_pt, g_kd, rtol=1e-5, atol=1e-7)


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(2, 37, 9, generator=g) * 3).requires_grad_(True)
    t = (torch.randn(2, 37, 9, generator=g) * 3).requires_grad_(True)
    y = torch.randint(0, 9, (2, 37), generator=g)
    y[1, ::3] = -100
    eps = [[float(c), -0.5, 0.25 * c] for c in range(9)]
    values, grads = [], []
    for chunk in (None, 10):
        loss = kdcore.create("loss", "ptloss", eps=eps, temperature=2.0, chunk_size=chunk)
        v = loss(s, t, y)
        values.append(v.detach())
        grads.append(torch.autograd.grad(v, (s, t)))
    torch.testing.assert_close(values[0], values[1], rtol=1e-6, atol=1e-7)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_bf16_inputs():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(8, 5, generator=g).bfloat16() * 3, torch.randn(8, 5, generator=g).bfloat16() * 3
    loss = kdcore.create("loss", "ptloss", eps=[2.0, 1.0])
    value = loss(s.requires_grad_(True), t)
    value.backward()
    assert value.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    assert value.item() == pytest.approx(reference(s.float(), t.float(), None, [2.0, 1.0], 1.0), rel=1e-5)


def test_padded_columns_and_confident_teacher():
    inf = float("inf")
    s = torch.tensor([[2.0, 1.0, -inf, -inf], [50.0, -50.0, 0.0, -inf]], requires_grad=True)
    t = torch.tensor([[80.0, -80.0, -inf, -inf], [1.0, 0.0, 2.0, -inf]])
    loss = kdcore.create("loss", "ptloss", eps=[3.0, -1.0, 2.0], temperature=2.0)
    value = loss(s, t)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()
    assert (s.grad[:, -1] == 0).all()
    assert value.item() == pytest.approx(reference(s.detach(), t, None, [3.0, -1.0, 2.0], 2.0), rel=1e-5)


def test_one_minus_q_exact_when_q_rounds_to_one():
    from kdcore_ptloss.functional import log1m_softmax

    logp = torch.log_softmax(torch.tensor([[0.0, -40.0, -45.0], [0.0, -200.0, float("-inf")]]), -1)
    got = log1m_softmax(logp)
    # 1 - q_0 = q_1 + q_2 although q_0 == 1.0 in float32
    assert got[0, 0].item() == pytest.approx(math.log(math.exp(-40.0) + math.exp(-45.0)), rel=1e-6)
    assert got[1, 0].item() == pytest.approx(-200.0, rel=1e-6)
    assert got[1, 2].item() == 0.0


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@st.composite
def extreme_batch(draw):
    n, c = draw(st.integers(1, 4)), draw(st.integers(2, 6))
    big = st.one_of(finite, st.sampled_from([0.0, 80.0, -80.0, 1e4, -1e4, 3e4]))
    s = torch.tensor(draw(st.lists(big, min_size=n * c, max_size=n * c))).reshape(n, c)
    t = torch.tensor(draw(st.lists(big, min_size=n * c, max_size=n * c))).reshape(n, c)
    pad = draw(st.lists(st.booleans(), min_size=c, max_size=c))
    pad[draw(st.integers(0, c - 1))] = False  # at least one real class
    s[:, torch.tensor(pad)] = float("-inf")
    t[:, torch.tensor(pad)] = float("-inf")
    m = draw(st.integers(1, 5))
    per_class = draw(st.booleans())
    coef = st.floats(-1.0, 10.0, allow_nan=False)
    eps = ([draw(st.lists(coef, min_size=m, max_size=m)) for _ in range(c)] if per_class
           else draw(st.lists(coef, min_size=m, max_size=m)))
    return s, t, eps, draw(st.sampled_from([1.0, 2.0, 4.0]))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extreme_batch())
def test_finite_values_and_grads(batch):
    s, t, eps, temperature = batch
    s, t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    value = kdcore.create("loss", "ptloss", eps=eps, temperature=temperature)(s, t)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("bad", ["x", [], [[1.0], [1.0, 2.0]], [float("nan")], [[1.0], "a"], True])
def test_invalid_eps(bad):
    if bad == []:  # an empty list is M = 0: plain KD
        kdcore.create("loss", "ptloss", eps=bad)
        return
    with pytest.raises(ConfigError, match="eps"):
        kdcore.create("loss", "ptloss", eps=bad)


def test_table_for_other_class_count():
    loss = kdcore.create("loss", "ptloss", eps=[[1.0], [2.0]])
    with pytest.raises(ValueError, match="2 classes"):
        loss(torch.zeros(2, 3), torch.zeros(2, 3))


def test_transforms_apply_to_teacher():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    with_ls = kdcore.create("loss", "ptloss", eps=[1.0], transforms=[{"name": "label_smoothing", "delta": 0.2}])
    smoothed = torch.log(0.8 * torch.softmax(t, -1) + 0.05)
    plain = kdcore.create("loss", "ptloss", eps=[1.0])
    assert with_ls(s, t).item() == pytest.approx(plain(s, smoothed).item(), rel=1e-6)
