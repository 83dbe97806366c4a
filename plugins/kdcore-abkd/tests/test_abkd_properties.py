"""Property tests: float32 values and gradients stay finite on extreme inputs
(huge logits, -inf padded columns in both models, very confident teachers)."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import kdcore
from kdcore.testing import assert_finite_with_grads

SETTINGS = settings(max_examples=30, deadline=None)
EXPONENTS = st.sampled_from([0.0, 1e-6, 0.1, 0.3, 0.5, 0.8, 1.0, 2.0])


def logit_arrays(bound: float):
    return hnp.arrays(np.float32, (2, 3, 9), elements=st.floats(-bound, bound, width=32))


@st.composite
def batches(draw, bound: float, confident: bool = True):
    """Student and teacher logits ``[2, 3, 9]``, some columns ``-inf`` in both, a
    teacher that may be very confident, targets with ignored positions."""
    s = torch.from_numpy(draw(logit_arrays(bound)))
    t = torch.from_numpy(draw(logit_arrays(bound))) * draw(st.sampled_from([1.0, 1e3] if confident else [1.0]))
    pad = draw(st.lists(st.integers(0, 8), max_size=4, unique=True))
    y = torch.tensor(draw(st.lists(st.sampled_from([-100, *range(9)]), min_size=6, max_size=6))).reshape(2, 3)
    y = torch.where(torch.isin(y, torch.tensor(pad)), torch.full_like(y, -100), y)
    s[..., pad] = -torch.inf
    t[..., pad] = -torch.inf
    return s, t, y


def check_finite(loss, s, t, y):
    value = assert_finite_with_grads(loss, s, t, y)
    assert value >= -1e-5 * max(1.0, abs(value.item()))


@SETTINGS
@given(batches(1e4), EXPONENTS, EXPONENTS, st.sampled_from([0.5, 1.0, 4.0]), st.sampled_from([None, 2]))
def test_abkd_finite(batch, a, b, temperature, chunk_size):
    loss = kdcore.create("loss", "abkd", alpha=a, beta=b, temperature=temperature, chunk_size=chunk_size)
    check_finite(loss, *batch)


@SETTINGS
@given(batches(2.0 ** 100), EXPONENTS, EXPONENTS)
def test_abkd_finite_on_huge_logits(batch, a, b):
    """Logits up to 2^100. Not for (0, 0): that member is ``sum (log p - log q)^2 / 2``,
    whose exact value leaves the float32 range once logits differ by ~1e19."""
    assume((a, b) != (0.0, 0.0))
    check_finite(kdcore.create("loss", "abkd", alpha=a, beta=b, temperature=1.0), *batch)


@SETTINGS
@given(batches(1e4), EXPONENTS, EXPONENTS, st.sampled_from([1.0, 4.0]))
def test_abdkd_finite(batch, a, b, temperature):
    loss = kdcore.create("loss", "abdkd", temperature=temperature, ab_alpha=a, ab_beta=b)
    check_finite(loss, *batch)


@SETTINGS
@given(batches(10.0, confident=False), st.floats(-1.0, 2.0), st.floats(-1.0, 2.0))
def test_negative_exponents_finite_on_moderate_logits(batch, a, b):
    """With a negative exponent the divergence is unbounded; on moderate logits it
    and its gradients are still finite, on the common support."""
    check_finite(kdcore.create("loss", "abkd", alpha=a, beta=b, temperature=1.0), *batch)


@SETTINGS
@given(hnp.arrays(np.float32, (4, 7), elements=st.floats(-50, 50, width=32)), EXPONENTS, EXPONENTS)
def test_divergence_of_a_distribution_with_itself_is_zero(z, a, b):
    logp = torch.log_softmax(torch.from_numpy(z), -1)
    assert torch.equal(kdcore.create("divergence", "ab", alpha=a, beta=b)(logp, logp), torch.zeros(4))
