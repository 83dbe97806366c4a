"""Hypothesis: dkd is finite, in value and gradients, on extreme float32 inputs:
huge logits, -inf padded columns in both models, very confident teachers
(1 - p_t underflowing), ignored rows, any divergence part."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdcore
from kdcore.testing import assert_finite_with_grads, extreme_batches

PARAMS = st.fixed_dictionaries({
    "temperature": st.sampled_from([0.5, 1.0, 4.0, 10.0]),
    "alpha": st.sampled_from([0.0, 1.0, 2.0]),
    "beta": st.sampled_from([0.0, 1.0, 8.0]),
}, optional={"divergence": st.just("rkl"), "nckd_divergence": st.just("rkl"),
             "chunk_size": st.integers(1, 3)})


@settings(max_examples=60, deadline=None)
@given(batch=extreme_batches(), params=PARAMS)
def test_finite_values_and_grads(batch, params):
    assert_finite_with_grads(kdcore.create("loss", "dkd", **params), *batch)


@settings(max_examples=20, deadline=None)
@given(batch=extreme_batches(), T=st.sampled_from([1.0, 4.0]))
def test_non_negative_with_kl(batch, T):
    zs, zt, y = batch
    assert kdcore.create("loss", "dkd", temperature=T)(zs, zt, y) >= 0


def test_token_level_extremes():
    """[B, T, C] extremes with chunking (extreme_batches draws [N, C] batches only)."""
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


@pytest.mark.parametrize("student", [[1e8, 0.0, 0.0], [1e8, 1.0, 0.0], [1e30, -3.0, 2.0]])
def test_non_negative_when_student_p_t_rounds_to_one(student):
    """Found by hypothesis: log-probabilities of logits 1e8 apart lose the non-target gaps."""
    zs, zt, y = torch.tensor([student]), torch.tensor([[50.0, 0.0, 0.0]]), torch.tensor([0])
    for T in (1.0, 4.0):
        assert kdcore.create("loss", "dkd", temperature=T)(zs, zt, y) >= 0
