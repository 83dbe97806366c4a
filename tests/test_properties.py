"""Hypothesis properties of the built-in losses and divergences in float32
(methods.md conventions: any float32 input gives finite values and gradients).

Inputs are drawn at extreme scales: logits up to 1e4 in magnitude, ``-inf``
padded columns shared by both models, teachers so confident that most of their
probabilities underflow to 0, temperatures in [0.5, 10] and token-level targets
with ignored (-100) positions, all positions ignored included.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import kdcore
from kdcore.losses import functional
from kdcore.testing import assert_finite_with_grads

SETTINGS = settings(max_examples=50, deadline=None)
NEG_INF = float("-inf")
unit = st.floats(-1.0, 1.0, width=32)


@st.composite
def logit_pairs(draw, token_level=True):
    """(student, teacher, target) float32 logits ``[B, T, C]`` (or ``[N, C]``)."""
    c = draw(st.integers(2, 9))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4))) if token_level and draw(st.booleans()) \
        else (draw(st.integers(1, 6)),)
    scale = draw(st.sampled_from([1.0, 30.0, 300.0, 1e4]))
    student = scale * draw(arrays(np.float32, (*shape, c), elements=unit))
    teacher = scale * draw(arrays(np.float32, (*shape, c), elements=unit))
    pad = draw(st.integers(0, c - 1))  # shared -inf columns, at least one real column
    labels = draw(arrays(np.int64, shape, elements=st.integers(0, c - pad - 1)))
    if draw(st.booleans()):  # very confident teacher: a +1e4 spike on one real class per row
        spike = draw(arrays(np.int64, shape, elements=st.integers(0, c - pad - 1)))
        np.put_along_axis(teacher, spike[..., None], 1e4, axis=-1)
    ignored = draw(arrays(np.bool_, shape, elements=st.booleans()))
    labels = np.where(ignored, -100, labels)
    if pad:
        student[..., c - pad:] = NEG_INF
        teacher[..., c - pad:] = NEG_INF
    return (torch.from_numpy(np.ascontiguousarray(student)), torch.from_numpy(np.ascontiguousarray(teacher)),
            torch.from_numpy(labels))


temperatures = st.floats(0.5, 10.0)


@SETTINGS
@given(data=logit_pairs(), temperature=temperatures, chunk_size=st.sampled_from([None, 2]),
       transforms=st.sampled_from([None, ["temperature"], [{"name": "label_smoothing", "delta": 0.1}]]),
       fused=st.booleans())
def test_kd_is_finite(data, temperature, chunk_size, transforms, fused):
    loss = kdcore.create("loss", "kd", temperature=temperature, chunk_size=chunk_size, transforms=transforms)
    with mock.patch.object(functional, "COMPOSITE_MAX_ELEMENTS", -1 if fused else 1 << 62):  # kd_rows's two paths
        value = assert_finite_with_grads(loss, *data)
    assert value >= -1e-4 * temperature ** 2  # a KL, up to float32 rounding


@SETTINGS
@given(data=logit_pairs(), temperature=temperatures, chunk_size=st.sampled_from([None, 2]),
       transforms=st.sampled_from([None, ["temperature"], [{"name": "label_smoothing", "delta": 0.1}]]),
       fused=st.booleans())
def test_rkd_is_finite(data, temperature, chunk_size, transforms, fused):
    loss = kdcore.create("loss", "rkd", temperature=temperature, chunk_size=chunk_size, transforms=transforms)
    with mock.patch.object(functional, "COMPOSITE_MAX_ELEMENTS", -1 if fused else 1 << 62):  # kd_rows's two paths
        value = assert_finite_with_grads(loss, *data)
    assert value >= -1e-4 * temperature ** 2


@SETTINGS
@given(data=logit_pairs(), label_smoothing=st.sampled_from([0.0, 0.1]), chunk_size=st.sampled_from([None, 2]))
def test_ce_is_finite(data, label_smoothing, chunk_size):
    loss = kdcore.create("loss", "ce", label_smoothing=label_smoothing, chunk_size=chunk_size)
    assert_finite_with_grads(loss, *data)


@SETTINGS
@given(data=logit_pairs(token_level=False), temperature=temperatures, name=st.sampled_from(["kl", "rkl"]))
def test_divergences_finite_and_nonnegative(data, temperature, name):
    """On log-probabilities at temperature T: finite per-row values and gradients,
    KL >= 0 (up to float32 rounding of terms of size |log p| <= ~1e4 / T), and
    KL(p || p) == 0 exactly."""
    student, teacher, _ = data
    div = kdcore.create("divergence", name)
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    s_logp = torch.log_softmax(s / temperature, -1)
    t_logp = torch.log_softmax(t / temperature, -1)
    value = div(t_logp, s_logp)
    assert value.shape == student.shape[:-1]
    assert torch.isfinite(value).all()
    value.sum().backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    tol = 1e-6 * (1.0 + max(t_logp[torch.isfinite(t_logp)].abs().max().item(),
                            s_logp[torch.isfinite(s_logp)].abs().max().item()))
    assert torch.all(value >= -tol), (value, tol)
    for logp in (s_logp.detach(), t_logp.detach()):
        assert torch.all(div(logp, logp) == 0)
