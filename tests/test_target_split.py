"""``kdcore.losses.functional.target_split_terms`` (fused target / non-target split) against a
plain float64 reference written from TAND paper eq. 3-5 and 7, and its general path."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcore.losses.functional import target_split_terms


def reference(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float):
    """Per-row (TCKD, NCKD, log q_t, log p_t, H(rho^t)) by loops over rows, float64."""
    out = []
    for i in range(s.shape[0]):
        p = torch.softmax(t[i].double() / temperature, -1)
        q = torch.softmax(s[i].double() / temperature, -1)
        k = int(y[i])
        pt, qt = p[k], q[k]
        tckd = sum(a * math.log(a / b) for a, b in ((pt, qt), (1 - pt, 1 - qt)) if a > 0)
        rest = [j for j in range(s.shape[1]) if j != k]
        rho_t, rho_s = p[rest] / (1 - pt), q[rest] / (1 - qt)
        nckd = sum(a * math.log(a / b) for a, b in zip(rho_t, rho_s) if a > 0)
        h = -sum(a * math.log(a) for a in rho_t if a > 0)
        out.append([float(tckd), float(nckd), math.log(qt), math.log(pt), float(h)])
    return torch.tensor(out, dtype=torch.float64).T


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("teacher_grad", [False, True])  # fused path / general path
def test_values_and_gradients_match_the_reference(temperature, teacher_grad):
    g = torch.Generator().manual_seed(1)
    s = (3 * torch.randn(9, 6, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = (3 * torch.randn(9, 6, generator=g, dtype=torch.float64)).requires_grad_(teacher_grad)
    y = torch.randint(0, 6, (9,), generator=g)
    split = target_split_terms(s, t, y, temperature, entropy=True)
    ref = reference(s.detach(), t.detach(), y, temperature)
    got = torch.stack([split.tckd, split.nckd, split.log_qt, split.log_pt, split.entropy]).detach()
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
    # gradients of a weighted sum of the student-dependent terms, against autograd on the reference formula
    w = torch.randn(3, 9, generator=g, dtype=torch.float64)
    grad, = torch.autograd.grad(w[0] @ split.tckd + w[1] @ split.nckd + w[2] @ split.log_qt, s)
    x = s.detach().clone().requires_grad_(True)
    q, p = torch.softmax(x / temperature, -1), torch.softmax(t.detach() / temperature, -1)
    onehot = torch.nn.functional.one_hot(y, 6).bool()
    qt, pt = q[onehot], p[onehot]
    tckd = pt * (pt / qt).log() + (1 - pt) * ((1 - pt) / (1 - qt)).log()
    rho_s = q.masked_fill(onehot, 1.0) / (1 - qt)[:, None]
    rho_t = p.masked_fill(onehot, 0.0) / (1 - pt)[:, None]
    nckd = (rho_t * (rho_t.clamp_min(1e-300).log() - rho_s.log())).sum(-1)
    want, = torch.autograd.grad(w[0] @ tckd + w[1] @ nckd + w[2] @ qt.log(), x)
    torch.testing.assert_close(grad, want, rtol=1e-8, atol=1e-10)


def test_the_fused_path_equals_the_general_path_in_float32():
    g = torch.Generator().manual_seed(2)
    s = (4 * torch.randn(64, 50, generator=g)).requires_grad_(True)
    t = 4 * torch.randn(64, 50, generator=g)
    y = torch.randint(0, 50, (64,), generator=g)
    fused = target_split_terms(s, t, y, 2.0, entropy=True)
    general = target_split_terms(s, t.clone().requires_grad_(True), y, 2.0, entropy=True)
    for a, b in zip(fused, general):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    ga, = torch.autograd.grad((fused.tckd + 8 * fused.nckd - fused.log_qt).sum(), s)
    gb, = torch.autograd.grad((general.tckd + 8 * general.nckd - general.log_qt).sum(), s)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


def test_padded_columns_one_real_column_and_far_apart_logits_stay_finite():
    inf = float("-inf")
    s = torch.tensor([[1e8, 0.0, -1e8, 5.0, inf], [3.0, inf, inf, inf, inf], [0.0, 2.0, 1.0, 0.5, inf]],
                     requires_grad=True)
    t = torch.tensor([[0.0, 1e8, 3.0, 1.0, inf], [2.0, inf, inf, inf, inf], [1.0, 0.0, 3.0, 2.0, inf]])
    y = torch.tensor([0, 0, 2])
    split = target_split_terms(s, t, y, 1.0, entropy=True)
    for v in (split.tckd, split.nckd, split.entropy):
        assert torch.isfinite(v).all()
    assert split.nckd[0].item() == pytest.approx(math.log1p(math.exp(5.0)), rel=1e-5)  # rho^t = [1, 0, 0]
    assert split.nckd[1] == 0 and split.tckd[1] == 0  # one real column: nothing to distil
    (split.tckd + split.nckd + split.log_qt).sum().backward()
    assert torch.isfinite(s.grad).all() and (s.grad[:, -1] == 0).all()


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(1e-3, 1e4), temperature=st.sampled_from([1.0, 4.0]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_finite_values_and_gradients_on_extreme_inputs(scale, temperature, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(5, 7, generator=g)).to(dtype).requires_grad_(True)
    t = (scale * torch.randn(5, 7, generator=g)).to(dtype)
    y = torch.randint(0, 7, (5,), generator=g)
    split = target_split_terms(s, t, y, temperature, entropy=True)
    total = (split.tckd + split.nckd + split.log_qt).sum()
    assert torch.isfinite(total) and torch.isfinite(split.entropy).all()
    total.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()
