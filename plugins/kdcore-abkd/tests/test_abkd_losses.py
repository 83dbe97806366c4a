"""The ``abkd`` and ``abdkd`` losses against plain float64 references written out
here (loops over kept rows, def. 4.1 / eq. 8 on softmax probabilities)."""

from __future__ import annotations

import math

import pytest
import torch

import kdcore
from kdcore.testing import check_logit_loss, value_and_grad


def ab_plain(p: torch.Tensor, q: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """D_AB of two float64 probability vectors, def. 4.1 (eq. 8 where a or b is 0)."""
    s = a + b
    if b == 0:
        return (p ** a * (a * p.log() - a * q.log()) - p ** a + q ** a).sum() / a ** 2
    if a == 0:
        return (q ** b * (b * q.log() - b * p.log()) - q ** b + p ** b).sum() / b ** 2
    return -(p ** a * q ** b - a / s * p ** s - b / s * q ** s).sum() / (a * b)


def abkd_reference(s, t, y, a, b, temperature):
    """``mean over kept rows of T^2 D_AB(softmax(t / T) || softmax(s / T))`` in float64."""
    c = s.shape[-1]
    s, t = s.reshape(-1, c).double(), t.reshape(-1, c).double()
    y = y.reshape(-1)
    total, count = 0.0, 0
    for i in range(s.shape[0]):
        if y[i] == -100:
            continue
        p = torch.softmax(t[i] / temperature, -1)
        q = torch.softmax(s[i] / temperature, -1)
        total = total + temperature ** 2 * ab_plain(p, q, a, b)
        count += 1
    return total / count


def abdkd_reference(s, t, y, alpha, beta, temperature, a, b):
    """``T^2 (alpha KL(b^t || b^s) + beta D_AB(rho^t || rho^s))`` averaged over kept rows."""
    c = s.shape[-1]
    s, t, y = s.reshape(-1, c), t.reshape(-1, c), y.reshape(-1)
    total, count = 0.0, 0
    for i in range(s.shape[0]):
        if y[i] == -100:
            continue
        count += 1
        p = torch.softmax(t[i].double() / temperature, -1)
        q = torch.softmax(s[i].double() / temperature, -1)
        k = int(y[i])
        bt, bs = torch.stack([p[k], 1 - p[k]]), torch.stack([q[k], 1 - q[k]])
        tckd = (bt * (bt.log() - bs.log())).sum()
        rest = [j for j in range(s.shape[1]) if j != k]
        nckd = ab_plain(p[rest] / p[rest].sum(), q[rest] / q[rest].sum(), a, b)
        total = total + temperature ** 2 * (alpha * tckd + beta * nckd)
    return total / count


def logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g), scale * torch.randn(*shape, generator=g)


@pytest.mark.parametrize("a,b,temperature", [(0.8, 0.3, 4.0), (0.2, 0.7, 1.0), (0.5, 0.5, 2.0),
                                             (1.0, 0.0, 4.0), (0.0, 1.0, 1.0), (1.2, -0.2, 3.0)])
def test_abkd_matches_reference_with_gradients(a, b, temperature):
    s, t = logits(16, 10, seed=1)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))
    loss = kdcore.create("loss", "abkd", alpha=a, beta=b, temperature=temperature)
    got, grad = value_and_grad(loss, s, t, y)
    want, want_grad = value_and_grad(abkd_reference, s.double(), t, y, a, b, temperature)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-7)


def assert_matches_on_kept_positions(loss, reference, s, t, y, *params):
    """Token-level value and student gradient against the float64 reference:
    ignored positions get exactly zero gradient, kept ones the reference's."""
    got, grad = value_and_grad(loss, s, t, y)
    want, want_grad = value_and_grad(reference, s.double(), t, y, *params)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-7)
    keep = y != -100
    assert (grad[~keep] == 0).all()
    torch.testing.assert_close(grad[keep].double(), want_grad[keep], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("a,b,temperature", [(0.2, 0.7, 1.0), (0.8, 0.3, 2.0)])
def test_abkd_token_level_ignores_positions(a, b, temperature):
    s, t = logits(3, 5, 50, seed=3, scale=4.0)
    y = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(4))
    y[0, 3:] = -100
    y[2, 0] = -100
    s[0, 4] = 1e4                   # an ignored position's values never reach the result
    loss = kdcore.create("loss", "abkd", alpha=a, beta=b, temperature=temperature)
    assert_matches_on_kept_positions(loss, abkd_reference, s, t, y, a, b, temperature)


def test_kd_with_ab_divergence_is_abkd():
    s, t = logits(12, 30, seed=7)
    y = torch.zeros(12, dtype=torch.long)
    for a, b in [(0.8, 0.3), (0.2, 0.7), (0.0, 0.0)]:
        kd = kdcore.create("loss", "kd", temperature=2.0, divergence={"name": "ab", "alpha": a, "beta": b})
        ab = kdcore.create("loss", "abkd", alpha=a, beta=b, temperature=2.0)
        torch.testing.assert_close(kd(s, t, y), ab(s, t, y), rtol=0, atol=0)
    kd_kl = kdcore.create("loss", "kd", temperature=2.0)
    kd_ab = kdcore.create("loss", "kd", temperature=2.0, divergence={"name": "ab", "alpha": 1, "beta": 0})
    torch.testing.assert_close(kd_ab(s, t, y), kd_kl(s, t, y), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("alpha,beta,temperature,a,b", [(1.0, 8.0, 4.0, 0.8, 0.3), (2.0, 0.5, 1.0, 0.2, 0.7),
                                                        (1.0, 1.0, 2.0, 1.0, 0.0)])
def test_abdkd_matches_reference(alpha, beta, temperature, a, b):
    s, t = logits(10, 8, seed=8)
    y = torch.randint(0, 8, (10,), generator=torch.Generator().manual_seed(9))
    loss = kdcore.create("loss", "abdkd", alpha=alpha, beta=beta, temperature=temperature, ab_alpha=a, ab_beta=b)
    got, grad = value_and_grad(loss, s, t, y)
    want, want_grad = value_and_grad(abdkd_reference, s.double(), t, y, alpha, beta, temperature, a, b)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("temperature,a,b", [(4.0, 0.8, 0.3), (1.0, 0.2, 0.7), (2.0, 0.0, 0.5)])
def test_abdkd_token_level_ignores_positions(temperature, a, b):
    s, t = logits(2, 6, 30, seed=16, scale=4.0)
    y = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(17))
    y[0, 4:] = -100
    y[1, 1] = -100
    s[0, 5] = 1e4                   # an ignored position's values never reach the result
    loss = kdcore.create("loss", "abdkd", alpha=2.0, beta=4.0, temperature=temperature, ab_alpha=a, ab_beta=b)
    assert_matches_on_kept_positions(loss, abdkd_reference, s, t, y, 2.0, 4.0, temperature, a, b)


def test_abdkd_with_kl_on_both_parts_is_dkd():
    """ab (1, 0) on NCKD is DKD itself; with alpha = 1, beta = 1 - p_t per row it would
    be KL (TAND paper thm 2.1); here: the same as the dkd plugin where installed."""
    if "dkd" not in kdcore.available("loss"):
        pytest.skip("kdcore-dkd is not installed")
    s, t = logits(9, 12, seed=10)
    y = torch.randint(0, 12, (9,), generator=torch.Generator().manual_seed(11))
    dkd = kdcore.create("loss", "dkd", alpha=1.0, beta=8.0, temperature=4.0,
                        nckd_divergence={"name": "ab", "alpha": 0.8, "beta": 0.3})
    abdkd = kdcore.create("loss", "abdkd")
    torch.testing.assert_close(abdkd(s, t, y), dkd(s, t, y), rtol=1e-6, atol=0)


def test_padded_vocabulary_columns():
    """-inf logits in both models (padded vocabulary) change nothing and get zero grads."""
    s, t = logits(2, 4, 20, seed=14)
    y = torch.randint(0, 20, (2, 4), generator=torch.Generator().manual_seed(15))
    pad = torch.full((2, 4, 6), -math.inf)
    for name in ("abkd", "abdkd"):
        loss = kdcore.create("loss", name, chunk_size=3)
        s_pad = torch.cat([s, pad], -1).requires_grad_()
        value = loss(s_pad, torch.cat([t, pad], -1), y)
        value.backward()
        torch.testing.assert_close(value, loss(s, t, y), rtol=1e-6, atol=0)
        assert torch.isfinite(s_pad.grad).all() and (s_pad.grad[..., 20:] == 0).all()


def test_defaults_and_parameter_errors():
    abkd = kdcore.create("loss", "abkd")
    assert (abkd.divergence.alpha, abkd.divergence.beta, abkd.temperature) == (0.8, 0.3, 4.0)
    abdkd = kdcore.create("loss", "abdkd")
    assert (abdkd.alpha, abdkd.beta, abdkd.temperature) == (1.0, 8.0, 4.0)
    assert (abdkd.nckd_divergence.alpha, abdkd.nckd_divergence.beta) == (0.8, 0.3)
    with pytest.raises(kdcore.ConfigError, match="ab_beta"):
        kdcore.create("loss", "abdkd", ab_beta="x")
    with pytest.raises(kdcore.ConfigError, match="temperature"):
        kdcore.create("loss", "abkd", temperature=0.0)
    with pytest.raises(kdcore.ConfigError, match="divergence"):
        kdcore.create("loss", "abkd", divergence="kl")
    with pytest.raises(ValueError, match="targets"):
        abdkd(torch.zeros(2, 3), torch.zeros(2, 3), None)


@pytest.mark.parametrize("name,params", [
    ("abkd", {}), ("abkd", {"alpha": 0.0, "beta": 0.0}), ("abkd", {"alpha": 0.2, "beta": 0.7, "temperature": 1.0}),
    ("abdkd", {}), ("abdkd", {"temperature": 1.0, "ab_alpha": 0.2, "ab_beta": 0.7}),
    ("kd", {"divergence": "ab"}),
])
def test_follows_the_logit_loss_conventions(name, params):
    """kdcore.testing: token level == flat, -100 positions, bf16 inputs, chunking."""
    check_logit_loss(kdcore.create("loss", name, **params))
