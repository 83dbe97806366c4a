"""Hypothesis: nkd is finite, in value and gradients, on extreme float32 inputs:
huge logits, -inf padded columns in both models, very confident teachers
(1 - p_t underflowing), ignored rows, with or without a divergence."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdcore
from kdcore.testing import assert_finite_with_grads, extreme_batches

PARAMS = st.fixed_dictionaries({
    "temperature": st.sampled_from([0.5, 1.0, 4.0, 10.0]),
    "gamma": st.sampled_from([0.0, 1.5, 4.0]),
}, optional={"divergence": st.sampled_from(["kl", "rkl"]), "chunk_size": st.integers(1, 3)})


@settings(max_examples=60, deadline=None)
@given(batch=extreme_batches(), params=PARAMS)
def test_finite_values_and_grads(batch, params):
    assert_finite_with_grads(kdcore.create("loss", "nkd", **params), *batch)


@settings(max_examples=20, deadline=None)
@given(batch=extreme_batches(), T=st.sampled_from([1.0, 4.0]))
def test_non_negative(batch, T):
    zs, zt, y = batch
    assert kdcore.create("loss", "nkd", temperature=T)(zs, zt, y) >= 0


def test_token_level_extremes():
    """[B, T, C] extremes with chunking (extreme_batches draws [N, C] batches only)."""
    zs = torch.full((2, 3, 6), -1e30)
    zs[..., 0] = 1e30
    zt = torch.zeros(2, 3, 6)
    zt[..., 1] = 1e4
    zs[..., 5] = zt[..., 5] = float("-inf")
    y = torch.tensor([[1, -100, 2], [0, 1, -100]])
    assert_finite_with_grads(kdcore.create("loss", "nkd", temperature=2.0, chunk_size=2), zs, zt, y)
