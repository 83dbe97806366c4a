"""Values: the pinned values of methods.md, a plain float64 reference on random
inputs ([N, C] and [B, T, C]), zero on equal inputs, the divergence contract,
parameters, -inf (padded) columns, float64 gradient checks."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import kdcore
from kdcore.testing import check_divergence, random_logits
from kdcore_divergences import akl_rows, akl_weights


def _load_reference():
    """The float64 reference next to this file (tests run with --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location("kdcore_divergences_reference",
                                                  Path(__file__).with_name("_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_reference()

NAMES = ["jsd", "skew_kl", "skew_rkl", "tvd", "akl"]
PARAMS = {"jsd": [{}, {"beta": 0.3}, {"beta": 0.9}], "skew_kl": [{}, {"alpha": 0.5}, {"alpha": 0.0}],
          "skew_rkl": [{}, {"alpha": 0.5}, {"alpha": 0.0}], "tvd": [{}], "akl": [{}, {"mu": 0.2}, {"mu": 0.9}]}
CASES = [(name, kw) for name in NAMES for kw in PARAMS[name]]
IDS = [f"{n}-{kw}" for n, kw in CASES]


def logp(probs, dtype=torch.float64):
    return torch.tensor(probs, dtype=dtype).log()


#: methods.md: p = [0.9, 0.1], q = [0.1, 0.9]
PINNED = {"jsd": 0.3680642, "skew_kl": 1.2380807, "skew_rkl": 1.2380807, "tvd": 0.8, "akl": 1.7577797}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pinned_values(name, dtype):
    div = kdcore.create("divergence", name)
    value = div(logp([[0.9, 0.1]], dtype), logp([[0.1, 0.9]], dtype))
    assert value.shape == (1,) and value.dtype == dtype
    assert abs(value.item() - PINNED[name]) < 5e-8 + (1e-6 if dtype == torch.float32 else 0)


def test_pinned_values_from_the_reference():
    p, q = np.array([0.9, 0.1]), np.array([0.1, 0.9])
    for name, fn in ref.REFERENCES.items():
        assert round(float(fn(p, q)), 7) == PINNED[name]


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
@pytest.mark.parametrize("shape", [(6, 11), (2, 3, 7)])
def test_against_float64_reference(name, kw, shape):
    zt, zs = random_logits(*shape, seed=3), random_logits(*shape, seed=4)
    p, q = ref.softmax(zt.double().numpy()), ref.softmax(zs.double().numpy())
    expected = ref.REFERENCES[name](p, q, **kw)
    div = kdcore.create("divergence", name, **kw)
    got64 = div(torch.log_softmax(zt.double(), -1), torch.log_softmax(zs.double(), -1))
    assert got64.shape == shape[:-1]
    np.testing.assert_allclose(got64.numpy(), expected, rtol=1e-10, atol=1e-13)
    got32 = div(torch.log_softmax(zt, -1), torch.log_softmax(zs, -1))
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.double().numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_zero_on_equal_inputs(name, kw):
    z = random_logits(5, 9, seed=1)
    z[:, 3] = -math.inf
    x = z.clone().requires_grad_()
    value = kdcore.create("divergence", name, **kw)(torch.log_softmax(z, -1), torch.log_softmax(x, -1))
    assert value.abs().max() < 1e-6
    value.sum().backward()  # a minimum: the gradient through the softmax is 0
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() < 1e-5


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_divergence_contract(name, kw):
    check_divergence(kdcore.create("divergence", name, **kw))
    check_divergence(kdcore.create("divergence", name, **kw), classes=3, seed=5)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_padded_columns_change_nothing(name, kw):
    """-inf in both models (padded vocabulary): the value equals the one without
    those columns, and the gradients there are exactly 0."""
    zt, zs = random_logits(4, 6, seed=7), random_logits(4, 6, seed=8)
    pad = torch.full((4, 3), -math.inf)
    zt_p, zs_p = torch.cat([zt[:, :2], pad, zt[:, 2:]], 1), torch.cat([zs[:, :2], pad, zs[:, 2:]], 1)
    div = kdcore.create("divergence", name, **kw)
    plain = div(torch.log_softmax(zt, -1), torch.log_softmax(zs, -1))
    a, b = zt_p.clone().requires_grad_(), zs_p.clone().requires_grad_()
    padded = div(torch.log_softmax(a, -1), torch.log_softmax(b, -1))
    torch.testing.assert_close(padded, plain, rtol=1e-6, atol=1e-7)
    padded.sum().backward()
    for g in (a.grad, b.grad):
        assert torch.isfinite(g).all()
        assert torch.all(g[:, 2:5] == 0)
    # the same on the log-probabilities directly (their gradients at -inf are 0 too)
    lp = torch.log_softmax(zt_p, -1).requires_grad_()
    lq = torch.log_softmax(zs_p, -1).requires_grad_()
    div(lp, lq).sum().backward()
    assert torch.all(lp.grad[:, 2:5] == 0) and torch.all(lq.grad[:, 2:5] == 0)
    assert torch.isfinite(lp.grad).all() and torch.isfinite(lq.grad).all()


@pytest.mark.parametrize("name,kw", [c for c in CASES if c[0] != "akl"], ids=[i for i in IDS if "akl" not in i])
def test_gradcheck_float64(name, kw):
    div = kdcore.create("divergence", name, **kw)
    zt = random_logits(3, 5, seed=11).double().requires_grad_()
    zs = random_logits(3, 5, seed=12).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: div(torch.log_softmax(a, -1), torch.log_softmax(b, -1)),
                                    (zt, zs))
    # on free (unnormalised) log-probabilities too: the written-out gradients do not assume sum p = 1
    lp = (0.5 * random_logits(2, 4, seed=13)).double().requires_grad_()
    lq = (0.5 * random_logits(2, 4, seed=14)).double().requires_grad_()
    assert torch.autograd.gradcheck(div, (lp, lq))


def test_akl_gradcheck_with_its_weights_fixed():
    """The AKL weights carry no gradient: with them held fixed the gradient is exact."""
    zt = random_logits(3, 6, seed=15).double().requires_grad_()
    zs = random_logits(3, 6, seed=16).double().requires_grad_()
    wh, wt = akl_weights(torch.log_softmax(zt, -1), torch.log_softmax(zs, -1))
    assert torch.autograd.gradcheck(
        lambda a, b: akl_rows(torch.log_softmax(a, -1), torch.log_softmax(b, -1), wh, wt), (zt, zs))
    # and the registered divergence has exactly those gradients
    div = kdcore.create("divergence", "akl")
    a, b = zt.detach().clone().requires_grad_(), zs.detach().clone().requires_grad_()
    div(torch.log_softmax(a, -1), torch.log_softmax(b, -1)).sum().backward()
    lp, lq = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
    manual = (wh * (lp.exp() * (lp - lq)).sum(-1) + wt * (lq.exp() * (lq - lp)).sum(-1)).sum()
    ga, gb = torch.autograd.grad(manual, (zt, zs))
    torch.testing.assert_close(a.grad, ga)
    torch.testing.assert_close(b.grad, gb)


def test_akl_weights_follow_the_head_rule():
    # p sorted: 0.4 (cum 0.4 <= 0.5: head), 0.3 (cum 0.7: tail), 0.2, 0.1
    p = torch.tensor([[0.2, 0.4, 0.1, 0.3]])
    q = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    wh, wt = akl_weights(p.log(), q.log(), mu=0.5)
    gh, gt = 0.15, 0.05 + 0.15 + 0.05
    torch.testing.assert_close(wh, torch.tensor([gh / (gh + gt)]))
    torch.testing.assert_close(wt, torch.tensor([gt / (gh + gt)]))
    # the top class is in the head even when it alone exceeds mu
    wh, wt = akl_weights(torch.tensor([[0.9, 0.1]]).log(), torch.tensor([[0.5, 0.5]]).log(), mu=0.5)
    torch.testing.assert_close(wh, torch.tensor([0.5]))
    # mu = 0: the head is the top class only; mu = 1: (up to rounding) every class
    wh0, _ = akl_weights(p.double().log(), q.double().log(), mu=0.0)
    torch.testing.assert_close(wh0, torch.tensor([0.15 / 0.4], dtype=torch.float64))


def test_akl_ties_are_deterministic():
    """Equal teacher probabilities are ordered by class index (a stable sort)."""
    p = torch.full((1, 4), 0.25, dtype=torch.float64)
    q = torch.tensor([[0.4, 0.1, 0.3, 0.2]], dtype=torch.float64)
    wh, wt = akl_weights(p.log(), q.log(), mu=0.5)  # head = classes 0, 1 (cum 0.25, 0.5)
    torch.testing.assert_close(wh, torch.tensor([0.3 / 0.4], dtype=torch.float64))
    for _ in range(3):
        assert torch.equal(akl_weights(p.log(), q.log(), mu=0.5)[0], wh)
    np.testing.assert_allclose(ref.akl_weights(p.numpy(), q.numpy())[0], wh.numpy())


def test_akl_is_zero_where_p_equals_q():
    lp = torch.log_softmax(random_logits(3, 5, seed=2), -1)
    x = lp.clone().requires_grad_()
    value = kdcore.create("divergence", "akl")(lp, x)
    assert torch.all(value == 0)
    value.sum().backward()
    assert torch.all(x.grad == 0)


def test_skew_alpha_zero_is_kl():
    lp = torch.log_softmax(random_logits(4, 6, seed=1), -1)
    lq = torch.log_softmax(random_logits(4, 6, seed=2), -1)
    kl, rkl = kdcore.create("divergence", "kl"), kdcore.create("divergence", "rkl")
    torch.testing.assert_close(kdcore.create("divergence", "skew_kl", alpha=0.0)(lp, lq), kl(lp, lq))
    torch.testing.assert_close(kdcore.create("divergence", "skew_rkl", alpha=0.0)(lp, lq), rkl(lp, lq))


def test_skew_kl_is_bounded_by_minus_log_alpha():
    """With a student that puts (almost) no mass where the teacher does, KL(p || m) -> -log alpha."""
    lp = torch.tensor([[0.0, -1e4]])
    lq = torch.tensor([[-1e4, 0.0]])
    for alpha in (0.1, 0.5):
        v = kdcore.create("divergence", "skew_kl", alpha=alpha)(lp, lq)
        assert abs(v.item() + math.log(alpha)) < 1e-6


def test_jsd_vanishes_at_the_endpoints():
    """JSD_beta ~ beta KL(p || q) as beta -> 0 (and ~ (1 - beta) KL(q || p) as beta -> 1):
    the family tends to 0, so the endpoints are rejected and kl / rkl are the limits to use."""
    lp = torch.log_softmax(random_logits(3, 5, seed=1).double(), -1)
    lq = torch.log_softmax(random_logits(3, 5, seed=2).double(), -1)
    kl, rkl = kdcore.create("divergence", "kl")(lp, lq), kdcore.create("divergence", "rkl")(lp, lq)
    b = 1e-6
    torch.testing.assert_close(kdcore.create("divergence", "jsd", beta=b)(lp, lq) / b, kl, rtol=1e-3, atol=0)
    torch.testing.assert_close(kdcore.create("divergence", "jsd", beta=1 - b)(lp, lq) / b, rkl, rtol=1e-3, atol=0)


@pytest.mark.parametrize("name,bad", [("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}), ("jsd", {"beta": -0.2}),
                                      ("jsd", {"beta": "0.5"}), ("jsd", {"beta": True}),
                                      ("jsd", {"beta": math.nan}), ("skew_kl", {"alpha": 1.0}),
                                      ("skew_kl", {"alpha": -0.1}), ("skew_rkl", {"alpha": 1.5}),
                                      ("akl", {"mu": 1.5}), ("akl", {"mu": -0.1}), ("akl", {"mu": None}),
                                      ("tvd", {"beta": 0.5})])
def test_invalid_parameters_name_the_parameter(name, bad):
    with pytest.raises(kdcore.ConfigError) as exc:
        kdcore.create("divergence", name, **bad)
    assert next(iter(bad)) in str(exc.value)


def test_jsd_endpoint_error_points_to_kl():
    with pytest.raises(kdcore.ConfigError, match="kl"):
        kdcore.create("divergence", "jsd", beta=1.0)


def test_defaults_and_repr():
    assert kdcore.create("divergence", "jsd").beta == 0.5
    assert kdcore.create("divergence", "skew_kl").alpha == 0.1
    assert kdcore.create("divergence", "skew_rkl").alpha == 0.1
    assert kdcore.create("divergence", "akl").mu == 0.5
    assert "0.3" in repr(kdcore.create("divergence", "jsd", beta=0.3))


def test_bfloat16_inputs_give_float32():
    lp = torch.log_softmax(random_logits(3, 5, seed=1), -1)
    lq = torch.log_softmax(random_logits(3, 5, seed=2), -1)
    for name in NAMES:
        div = kdcore.create("divergence", name)
        out = div(lp.bfloat16(), lq.bfloat16())
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, div(lp.bfloat16().float(), lq.bfloat16().float()))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        kdcore.create("divergence", "jsd")(torch.zeros(2, 3), torch.zeros(2, 4))
