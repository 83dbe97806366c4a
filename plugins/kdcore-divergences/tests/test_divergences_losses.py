"""Composition: the divergences inside divergence-pluggable losses (``kd``, ``dkd``)
on token-level inputs with ignored positions, against a float64 reference of the
loss (T^2 * D per kept row, mean over kept rows)."""

from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

import kdcore
from kdcore.testing import check_logit_loss, random_logits, random_targets


def _load_reference():
    spec = importlib.util.spec_from_file_location("kdcore_divergences_reference",
                                                  Path(__file__).with_name("_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_reference()
SPECS = ["jsd", {"name": "jsd", "beta": 0.3}, "skew_kl", {"name": "skew_rkl", "alpha": 0.4}, "tvd", "akl",
         {"name": "akl", "mu": 0.7}]


def _split(spec):
    return (spec, {}) if isinstance(spec, str) else (spec["name"], {k: v for k, v in spec.items() if k != "name"})


def batch(b=3, t=5, c=7, seed=0):
    zs, zt = random_logits(b, t, c, seed=seed), random_logits(b, t, c, seed=seed + 9)
    y = random_targets(b, t, classes=c, seed=seed, ignore_frac=0.3)
    y[0, 0], y[1, 1] = 2, -100
    return zs, zt, y


def kd_reference(zs, zt, y, name, kw, temperature):
    keep = (y != -100).numpy()
    p = ref.softmax(zt.double().numpy()[keep], temperature)
    q = ref.softmax(zs.double().numpy()[keep], temperature)
    return temperature ** 2 * ref.REFERENCES[name](p, q, **kw).mean()


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_with_divergence_matches_reference(spec, temperature):
    name, kw = _split(spec)
    zs, zt, y = batch()
    loss = kdcore.create("loss", "kd", divergence=spec, temperature=temperature)
    value = loss(zs, zt, y)
    assert value.dim() == 0
    np.testing.assert_allclose(value.item(), kd_reference(zs, zt, y, name, kw, temperature), rtol=2e-5)


def test_kd_jsd_by_name_token_level():
    """``kdcore.create("loss", "kd", divergence="jsd")`` on [B, T, V] with -100 positions,
    whose student gradients are 0; float64 value to 1e-10."""
    zs, zt, y = batch(2, 6, 11, seed=4)
    loss = kdcore.create("loss", "kd", divergence="jsd")
    s = zs.double().requires_grad_()
    value = loss(s, zt.double(), y)
    np.testing.assert_allclose(value.item(), kd_reference(zs, zt, y, "jsd", {}, 4.0), rtol=1e-10)
    value.backward()
    assert torch.all(s.grad[y == -100] == 0) and s.grad[y != -100].abs().sum() > 0


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_kd_with_divergence_follows_the_loss_contract(spec):
    check_logit_loss(kdcore.create("loss", "kd", divergence=spec, temperature=2.0))
    check_logit_loss(kdcore.create("loss", "kd", divergence=spec, temperature=1.0, chunk_size=3), seed=1)


def _dkd_installed() -> bool:
    try:
        metadata.distribution("kdcore-dkd")
    except metadata.PackageNotFoundError:
        return False
    return "dkd" in kdcore.available("loss")


needs_dkd = pytest.mark.skipif(not _dkd_installed(), reason="kdcore-dkd is not installed")


def dkd_reference(zs, zt, y, name, kw, alpha=1.0, beta=8.0, temperature=4.0):
    """DKD (Zhao et al. 2022) with D in both parts: T^2 (alpha D(b^t || b^s) + beta D(rho^t || rho^s)),
    b = [p_t, 1 - p_t], rho the non-target distribution renormalised; mean over kept rows."""
    keep = (y != -100).numpy()
    p = ref.softmax(zt.double().numpy()[keep], temperature)
    q = ref.softmax(zs.double().numpy()[keep], temperature)
    t = y.numpy()[keep]
    rows = np.arange(len(t))
    pt, qt = p[rows, t], q[rows, t]
    bp, bq = np.stack([pt, 1 - pt], -1), np.stack([qt, 1 - qt], -1)
    others = np.ones_like(p, dtype=bool)
    others[rows, t] = False
    rp = p[others].reshape(len(t), -1) / (1 - pt)[:, None]
    rq = q[others].reshape(len(t), -1) / (1 - qt)[:, None]
    div = ref.REFERENCES[name]
    return temperature ** 2 * (alpha * div(bp, bq, **kw) + beta * div(rp, rq, **kw)).mean()


@needs_dkd
@pytest.mark.parametrize("spec", [{"name": "jsd", "beta": 0.3}, "jsd", "skew_kl", "tvd", "akl"], ids=str)
def test_dkd_with_divergence_matches_reference(spec):
    name, kw = _split(spec)
    zs, zt, y = batch(3, 4, 9, seed=2)
    loss = kdcore.create("loss", "dkd", divergence=spec)
    s = zs.clone().requires_grad_()
    value = loss(s, zt, y)
    np.testing.assert_allclose(value.item(), dkd_reference(zs, zt, y, name, kw), rtol=2e-5)
    value.backward()
    assert torch.isfinite(s.grad).all() and torch.all(s.grad[y == -100] == 0)


@needs_dkd
def test_dkd_jsd_follows_the_loss_contract():
    check_logit_loss(kdcore.create("loss", "dkd", divergence={"name": "jsd", "beta": 0.3}))


def test_tvd_from_logits_equals_the_log_space_path_in_value_and_gradients():
    """``kd`` takes tvd's probability-space path (``from_logits``); it is the same
    function as ``tvd(log_softmax(z_t), log_softmax(z_s))``, -inf columns included,
    with gradients to both sides."""
    tvd = kdcore.create("divergence", "tvd")
    g = torch.Generator().manual_seed(3)
    zt, zs = torch.randn(6, 9, generator=g, dtype=torch.float64) * 3, torch.randn(6, 9, generator=g,
                                                                                   dtype=torch.float64) * 3
    zt[:, [1, 4]] = zs[:, [1, 4]] = -torch.inf
    weights = torch.arange(1.0, 7.0, dtype=torch.float64)
    results = []
    for path in ("logits", "log_probs"):
        a, b = zt.clone().requires_grad_(), zs.clone().requires_grad_()
        rows = tvd.from_logits(a, b) if path == "logits" else tvd(torch.log_softmax(a, -1), torch.log_softmax(b, -1))
        (rows * weights).sum().backward()
        results.append((rows.detach(), a.grad, b.grad))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    assert torch.all(results[0][1][:, [1, 4]] == 0) and torch.all(results[0][2][:, [1, 4]] == 0)
    p, q = ref.softmax(zt.numpy(), 1.0), ref.softmax(zs.numpy(), 1.0)
    np.testing.assert_allclose(results[0][0].numpy(), ref.tvd(p, q), rtol=1e-12)


def test_tvd_from_logits_gradients_match_finite_differences():
    tvd = kdcore.create("divergence", "tvd")
    g = torch.Generator().manual_seed(4)
    zt = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    zs = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: tvd.from_logits(a, b), (zt, zs))
