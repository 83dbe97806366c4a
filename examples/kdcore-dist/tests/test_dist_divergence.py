"""The pearson divergence against a float64 reference, its edge cases, and its
use through kd (any divergence-pluggable loss)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdcore
from kdcore.testing import check_divergence, random_logits
from kdcore_dist import pearson


def reference(p_logp: torch.Tensor, q_logp: torch.Tensor) -> np.ndarray:
    p, q = p_logp.double().exp().numpy(), q_logp.double().exp().numpy()
    return np.array([1 - np.corrcoef(a, b)[0, 1] for a, b in zip(p, q)])


def test_value_equals_the_reference():
    p = torch.log_softmax(random_logits(6, 5, seed=1), -1)
    q = torch.log_softmax(random_logits(6, 5, seed=2), -1)
    np.testing.assert_allclose(kdcore.create("divergence", "pearson")(p, q).numpy(), reference(p, q), rtol=1e-5)


def test_follows_the_divergence_conventions():
    check_divergence(kdcore.create("divergence", "pearson"))


def test_constant_vectors_have_the_stated_convention():
    u = torch.full((4,), 0.25)
    assert pearson(u, u).item() == 1.0
    assert pearson(u, torch.tensor([0.1, 0.2, 0.3, 0.4])).item() == 0.0


def test_through_kd():
    zs, zt = random_logits(4, 5, seed=3), random_logits(4, 5, seed=4)
    loss = kdcore.create("loss", "kd", temperature=2.0, divergence="pearson")
    expected = 4.0 * reference(torch.log_softmax(zt / 2, -1), torch.log_softmax(zs / 2, -1)).mean()
    assert loss(zs, zt).item() == pytest.approx(expected, rel=1e-5)


@settings(max_examples=40, deadline=None)
@given(scale=st.sampled_from([1.0, 30.0, 1e4, 1e30]), seed=st.integers(0, 10_000))
def test_finite_with_finite_gradients_at_any_scale(scale, seed):
    z = (random_logits(3, 6, seed=seed, scale=1.0) * scale).requires_grad_()
    w = (random_logits(3, 6, seed=seed + 1, scale=1.0) * scale).requires_grad_()
    value = kdcore.create("divergence", "pearson")(torch.log_softmax(z, -1), torch.log_softmax(w, -1)).sum()
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all() and torch.isfinite(w.grad).all()
