"""Hypothesis: dkd is finite, in value and gradients, on extreme float32 inputs:
huge logits, -inf padded columns in both models, very confident teachers
(1 - p_t underflowing), ignored rows, any divergence part."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import kdcore

UNIT = st.floats(min_value=-1.0, max_value=1.0, width=32)
SCALES = st.sampled_from([1.0, 30.0, 1e4, 1e8, 1e30])


@st.composite
def extreme_batch(draw):
    n = draw(st.integers(1, 5))
    c = draw(st.integers(3, 9))
    zs = draw(arrays(np.float32, (n, c), elements=UNIT)) * np.float32(draw(SCALES))
    zt = draw(arrays(np.float32, (n, c), elements=UNIT)) * np.float32(draw(SCALES))
    padded = draw(st.lists(st.booleans(), min_size=c, max_size=c))
    padded[draw(st.integers(0, c - 1))] = False
    finite_cols = [k for k in range(c) if not padded[k]]
    if len(finite_cols) < 2:  # at least two real classes
        padded[next(k for k in range(c) if padded[k])] = False
        finite_cols = [k for k in range(c) if not padded[k]]
    y = np.array([draw(st.sampled_from(finite_cols + [-100])) for _ in range(n)])
    zs, zt = torch.from_numpy(zs.copy()), torch.from_numpy(zt.copy())
    if draw(st.booleans()):  # very confident teacher: 1 - p_t underflows
        gap = draw(st.sampled_from([50.0, 200.0, 1e4]))
        rows = torch.arange(n)[torch.from_numpy(y) >= 0]
        zt[rows, torch.from_numpy(y)[rows]] = zt.max() + gap
    cols = torch.tensor(padded)
    zs[:, cols] = float("-inf")
    zt[:, cols] = float("-inf")
    return zs, zt, torch.from_numpy(y)


PARAMS = st.fixed_dictionaries({
    "temperature": st.sampled_from([0.5, 1.0, 4.0, 10.0]),
    "alpha": st.sampled_from([0.0, 1.0, 2.0]),
    "beta": st.sampled_from([0.0, 1.0, 8.0]),
}, optional={"divergence": st.just("rkl"), "nckd_divergence": st.just("rkl"),
             "chunk_size": st.integers(1, 3)})


def assert_finite_with_grads(loss, zs, zt, y):
    s = zs.clone().requires_grad_()
    t = zt.clone().requires_grad_()
    value = loss(s, t, y)
    value.backward()
    assert torch.isfinite(value), value
    assert torch.isfinite(s.grad).all(), s.grad
    assert torch.isfinite(t.grad).all(), t.grad
    ignored = y == -100
    assert torch.all(s.grad[ignored] == 0) and torch.all(t.grad[ignored] == 0)


@settings(max_examples=60, deadline=None)
@given(batch=extreme_batch(), params=PARAMS)
def test_finite_values_and_grads(batch, params):
    assert_finite_with_grads(kdcore.create("loss", "dkd", **params), *batch)


@settings(max_examples=20, deadline=None)
@given(batch=extreme_batch(), T=st.sampled_from([1.0, 4.0]))
def test_non_negative_with_kl(batch, T):
    zs, zt, y = batch
    assert kdcore.create("loss", "dkd", temperature=T)(zs, zt, y) >= 0


def test_token_level_extremes():
    zs = torch.full((2, 3, 6), -1e30)
    zs[..., 0] = 1e30
    zt = torch.zeros(2, 3, 6)
    zt[..., 1] = 1e4
    zs[..., 5] = zt[..., 5] = float("-inf")
    y = torch.tensor([[1, -100, 2], [0, 1, -100]])
    assert_finite_with_grads(kdcore.create("loss", "dkd", chunk_size=2), zs, zt, y)


def test_single_real_column():
    """A row with one finite column (all others padded) whose target is that column."""
    zs = torch.tensor([[2.0, float("-inf"), float("-inf")], [0.5, 1.0, float("-inf")]])
    zt = torch.tensor([[1.0, float("-inf"), float("-inf")], [1.0, 0.0, float("-inf")]])
    assert_finite_with_grads(kdcore.create("loss", "dkd"), zs, zt, torch.tensor([0, 1]))
