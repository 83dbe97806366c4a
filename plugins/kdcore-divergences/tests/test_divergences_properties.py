"""Property tests: float32 values and gradients stay finite on extreme inputs
(logits up to 1e30 and 1e4 apart, -inf padded columns in both models, very
confident teachers, probabilities that underflow), for the divergences alone
and inside the ``kd`` loss."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdcore
from kdcore.testing import assert_finite_with_grads, extreme_batches

SETTINGS = settings(max_examples=30, deadline=None)
DIVERGENCES = st.sampled_from([("jsd", {}), ("jsd", {"beta": 0.01}), ("jsd", {"beta": 0.99}),
                               ("skew_kl", {}), ("skew_kl", {"alpha": 0.9}), ("skew_rkl", {}),
                               ("skew_rkl", {"alpha": 1e-6}), ("tvd", {}), ("akl", {}), ("akl", {"mu": 0.9})])


@SETTINGS
@given(extreme_batches(), DIVERGENCES, st.sampled_from([1.0, 4.0]))
def test_kd_with_each_divergence_is_finite(batch, spec, temperature):
    name, kw = spec
    loss = kdcore.create("loss", "kd", divergence={"name": name, **kw}, temperature=temperature)
    value = assert_finite_with_grads(loss, *batch)
    assert value >= -1e-5


@st.composite
def log_prob_pairs(draw):
    """Float32 ``[2, 3, 8]`` logits scaled up to 1e30, a teacher that may be very
    confident (one logit 1e4 above the rest), shared -inf columns (at least two real)."""
    unit = hnp.arrays(np.float32, (2, 3, 8), elements=st.floats(-1.0, 1.0, width=32))
    scale = draw(st.sampled_from([1.0, 50.0, 1e4, 1e8, 1e30]))
    zt = torch.from_numpy(draw(unit)) * np.float32(scale)
    zs = torch.from_numpy(draw(unit)) * np.float32(draw(st.sampled_from([1.0, 1e4, 1e30])))
    if draw(st.booleans()):
        zt[..., draw(st.integers(0, 7))] += 1e4
    pad = draw(st.lists(st.integers(0, 7), max_size=6, unique=True))
    zt[..., pad] = -math.inf
    zs[..., pad] = -math.inf
    return zt, zs, pad


@SETTINGS
@given(log_prob_pairs(), DIVERGENCES)
def test_divergence_values_and_gradients_are_finite(pair, spec):
    zt, zs, pad = pair
    name, kw = spec
    a, b = zt.clone().requires_grad_(), zs.clone().requires_grad_()
    lp, lq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    lp.retain_grad()
    lq.retain_grad()
    rows = kdcore.create("divergence", name, **kw)(lp, lq)
    assert rows.shape == (2, 3) and rows.dtype == torch.float32
    assert torch.isfinite(rows).all() and (rows >= -1e-5).all(), rows
    (rows * torch.arange(1.0, 7.0).reshape(2, 3)).sum().backward()
    for g in (a.grad, b.grad, lp.grad, lq.grad):
        assert torch.isfinite(g).all(), g
    if len(pad) < 8:
        for g in (a.grad, b.grad, lp.grad, lq.grad):
            assert torch.all(g[..., pad] == 0)


@SETTINGS
@given(log_prob_pairs(), st.sampled_from(["jsd", "skew_kl", "skew_rkl", "tvd"]))
def test_bounded_divergences_stay_in_their_bounds(pair, name):
    """jsd <= log 2 (beta = 1/2), skew KL <= -log alpha, tvd <= 1, on any input."""
    zt, zs, _ = pair
    rows = kdcore.create("divergence", name)(torch.log_softmax(zt, -1), torch.log_softmax(zs, -1))
    bound = {"jsd": math.log(2), "skew_kl": -math.log(0.1), "skew_rkl": -math.log(0.1), "tvd": 1.0}[name]
    assert (rows <= bound * (1 + 1e-5) + 1e-6).all(), rows
