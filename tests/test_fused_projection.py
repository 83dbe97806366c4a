"""The fused vocabulary projection equals the dense path: values and gradients
(to both models' hidden states and to the heads' parameters) in float64, on
token-level inputs with ignored positions, for every registered divergence
through ``kd`` and for every registered logit loss."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import kdcore
from kdcore.losses import LogitLoss
from kdcore.losses.fused import head_parameters
from kdcore.plugins import default_registry

B, T, H, V = 3, 7, 5, 11


class SoftCapHead(nn.Module):
    """A head with final soft-capping and a logit scale (gemma2 / cohere style)."""

    def __init__(self, linear: nn.Linear, cap: float = 3.0, scale: float = 0.7):
        super().__init__()
        self.linear, self.cap, self.scale = linear, cap, scale

    def forward(self, h):
        return self.cap * torch.tanh(self.linear(h) * self.scale / self.cap)


def models(seed=0, head="linear"):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    ht = torch.randn(B, T, H + 2, generator=g, dtype=torch.float64)
    s_head = nn.Linear(H, V).double()
    t_head = nn.Linear(H + 2, V).double()
    if head == "softcap":
        s_head = SoftCapHead(s_head)
    if head == "tied":  # the student's head is its embedding matrix
        emb = nn.Embedding(V, H).double()
        s_head = TiedHead(emb)
    target = torch.randint(0, V, (B, T), generator=g)
    target[0, :3] = -100
    target[2, -1] = -100
    return hs, ht, s_head, t_head, target


class TiedHead(nn.Module):
    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, h):
        return h @ self.embedding.weight.T


def compare(dense_loss, fused_loss, head="linear", teacher_grad=True, seed=0, target_none=False):
    """Dense and fused value and gradients; ``teacher_grad=False``: the teacher's
    hidden states and head are frozen."""
    hs, ht, s_head, t_head, target = models(seed, head)
    if head == "padded":
        s_head, t_head = PaddedHead(s_head), PaddedHead(t_head)
    t_head.requires_grad_(teacher_grad)
    if target_none:
        target = None
    results = []
    for loss, fused in ((dense_loss, False), (fused_loss, True)):
        s_h = hs.clone().requires_grad_()
        t_h = ht.clone().requires_grad_(teacher_grad)
        for p in [*s_head.parameters(), *t_head.parameters()]:
            p.grad = None
        if fused:
            value = loss(kdcore.Outputs(hidden=s_h, head=s_head), kdcore.Outputs(hidden=t_h, head=t_head), target)
        else:
            value = loss(s_head(s_h), t_head(t_h), target)
        (1.7 * value).backward()
        results.append((value.detach(), s_h.grad, t_h.grad,
                        [p.grad.clone() if p.grad is not None else None for p in s_head.parameters()]))
    (v1, gs1, gt1, gp1), (v2, gs2, gt2, gp2) = results
    torch.testing.assert_close(v2, v1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gs2, gs1, rtol=1e-9, atol=1e-12)
    if teacher_grad and gt1 is not None:
        torch.testing.assert_close(gt2, gt1, rtol=1e-9, atol=1e-12)
    for a, b in zip(gp1, gp2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    return v1


@pytest.mark.parametrize("divergence", kdcore.available("divergence"))
def test_kd_with_every_divergence_fused_equals_dense(divergence):
    dense = kdcore.create("loss", "kd", temperature=2.0, divergence=divergence)
    fused = kdcore.create("loss", "kd", temperature=2.0, divergence=divergence, chunk_size=4)
    value = compare(dense, fused)
    assert torch.isfinite(value)


def _logit_losses():
    out = []
    for name in kdcore.available("loss"):
        factory = default_registry().get("loss", name).factory
        if isinstance(factory, type) and issubclass(factory, LogitLoss) and not factory.batch_level:
            out.append(name)
    return out


@pytest.mark.parametrize("name", _logit_losses())
def test_every_logit_loss_fused_equals_dense(name):
    try:
        dense = kdcore.create("loss", name)
        fused = kdcore.create("loss", name, chunk_size=5)
    except kdcore.ConfigError as exc:
        pytest.skip(f"{name} needs parameters: {exc}")
    compare(dense, fused)


@pytest.mark.parametrize("head", ["softcap", "tied"])
def test_soft_capped_and_tied_heads(head):
    compare(kdcore.create("loss", "kd"), kdcore.create("loss", "kd", chunk_size=3), head=head)
    compare(kdcore.create("loss", "ce"), kdcore.create("loss", "ce", chunk_size=3), head=head)


def test_frozen_teacher_and_no_target():
    compare(kdcore.create("loss", "kd"), kdcore.create("loss", "kd", chunk_size=2), teacher_grad=False)
    compare(kdcore.create("loss", "rkd"), kdcore.create("loss", "rkd", chunk_size=2), target_none=True)


def test_every_position_ignored_gives_zero_and_finite_gradients():
    hs, ht, s_head, t_head, target = models()
    target.fill_(-100)
    s_h = hs.clone().requires_grad_()
    loss = kdcore.create("loss", "kd", chunk_size=4)
    value = loss(kdcore.Outputs(hidden=s_h, head=s_head), kdcore.Outputs(hidden=ht, head=t_head), target)
    value.backward()
    assert float(value.detach()) == 0.0 and torch.equal(s_h.grad, torch.zeros_like(s_h))


def test_logits_are_never_materialised_whole():
    """Every head call sees at most chunk_size rows (and only kept ones)."""
    hs, ht, s_head, t_head, target = models()
    seen = []
    s_head.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    t_head.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    s, t = kdcore.Outputs(hidden=hs, head=s_head), kdcore.Outputs(hidden=ht, head=t_head)
    kdcore.create("loss", "kd", chunk_size=4)(s, t, target)
    kept = int((target != -100).sum())
    assert max(seen) <= 4 and sum(seen) == 2 * kept
    assert not s.has_logits and not t.has_logits


def test_without_chunk_size_outputs_use_their_logits():
    hs, ht, s_head, t_head, target = models()
    s = kdcore.Outputs(hidden=hs, head=s_head)
    kdcore.create("loss", "kd")(s, kdcore.Outputs(hidden=ht, head=t_head), target)
    assert s.has_logits


def test_batch_level_losses_refuse_chunking():
    class Corr(LogitLoss):
        batch_level = True

    with pytest.raises(kdcore.ConfigError, match="chunk_size: Corr is a batch-level loss"):
        Corr(chunk_size=4)


class Model(nn.Module):
    """A model whose head is a method (``model.project``), not a module."""

    def __init__(self, linear):
        super().__init__()
        self.linear, self.unused = linear, nn.Linear(2, 2).double()

    def project(self, h):
        return 2.0 * torch.tanh(self.linear(h) / 2.0)


class ExplicitHead:
    """A plain callable that names its parameters with a ``parameters()`` method."""

    def __init__(self, weight):
        self.weight = weight

    def __call__(self, h):
        return h @ self.weight.T

    def parameters(self):
        return [self.weight]


def _head_forms(linear):
    weight = nn.Parameter(linear.weight.detach().clone())
    return {
        "bound method": (Model(linear).project, [linear.weight, linear.bias]),
        "partial": (functools.partial(torch.nn.functional.linear, weight=linear.weight, bias=linear.bias),
                    [linear.weight, linear.bias]),
        "explicit parameters()": (ExplicitHead(weight), [weight]),
    }


@pytest.mark.parametrize("form", ["bound method", "partial", "explicit parameters()"])
def test_head_rule_gives_the_dense_gradients_to_the_head(form):
    hs, ht, _, t_head, target = models()
    head, params = _head_forms(nn.Linear(H, V).double())[form]
    assert {id(p) for p in params} <= {id(p) for p in head_parameters(head)}
    results = []
    for loss in (kdcore.create("loss", "kd"), kdcore.create("loss", "kd", chunk_size=4)):
        for p in params:
            p.grad = None
        s_h = hs.clone().requires_grad_()
        s = kdcore.Outputs(hidden=s_h, head=head) if loss.chunk_size else head(s_h)
        (0.5 * loss(s, t_head(ht).detach(), target)).backward()
        results.append([s_h.grad, *(p.grad for p in params)])
    for dense, fused in zip(*results):
        torch.testing.assert_close(fused, dense, rtol=1e-9, atol=1e-12)
    if form == "bound method":  # parameters the head does not use get no gradient, as in the dense path
        assert all(p.grad is None for p in head.__self__.unused.parameters())


def test_a_plain_function_head_has_no_parameters():
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    assert head_parameters(lambda h: h @ w.T) == []


def test_trainable_teacher_head_and_shared_head_get_their_gradients():
    """Both heads trainable (an online teacher), and one head shared by both models."""
    hs, ht, s_head, _, target = models()
    t_head = nn.Linear(H, V).double()
    for teacher_head in (t_head, s_head):
        grads = []
        for loss in (kdcore.create("loss", "kd"), kdcore.create("loss", "kd", chunk_size=4)):
            heads = [s_head, teacher_head]
            for p in (*s_head.parameters(), *t_head.parameters()):
                p.grad = None
            s_h, t_h = hs.clone().requires_grad_(), hs.flip(0).clone().requires_grad_()
            if loss.chunk_size:
                value = loss(kdcore.Outputs(hidden=s_h, head=heads[0]), kdcore.Outputs(hidden=t_h, head=heads[1]),
                             target)
            else:
                value = loss(heads[0](s_h), heads[1](t_h), target)
            value.backward()
            grads.append([s_h.grad, t_h.grad] + [p.grad for p in (*s_head.parameters(), *t_head.parameters())])
        for dense, fused in zip(*grads):
            assert (dense is None) == (fused is None)
            if dense is not None:
                torch.testing.assert_close(fused, dense, rtol=1e-9, atol=1e-12)


def test_student_outputs_with_teacher_logits_and_ce_without_teacher():
    hs, ht, s_head, t_head, target = models()
    s_h = hs.clone().requires_grad_()
    fused = kdcore.create("loss", "kd", chunk_size=4)(kdcore.Outputs(hidden=s_h, head=s_head), t_head(ht), target)
    dense = kdcore.create("loss", "kd")(s_head(hs), t_head(ht), target)
    torch.testing.assert_close(fused, dense, rtol=1e-10, atol=1e-12)
    ce = kdcore.create("loss", "ce", chunk_size=4)(kdcore.Outputs(hidden=hs, head=s_head), None, target)
    torch.testing.assert_close(ce, kdcore.create("loss", "ce")(s_head(hs), None, target), rtol=1e-10, atol=1e-12)


def test_kd_without_target_keeps_every_row():
    compare(kdcore.create("loss", "kd"), kdcore.create("loss", "kd", chunk_size=4), target_none=True)


class PaddedHead(nn.Module):
    """A linear head whose last two vocabulary columns are padding (-inf logits)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, h):
        z = self.linear(h)
        return torch.cat([z[..., :-2], torch.full_like(z[..., -2:], float("-inf"))], dim=-1)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("head", ["linear", "softcap", "tied", "padded"])
def test_lean_kd_chunk_equals_dense_with_a_frozen_teacher(monkeypatch, head, temperature):
    """kd with a frozen teacher goes through kdcore.losses.fused.kd_chunk and gives the dense
    value and gradients (student hidden states and head) in float64."""
    import kdcore.losses.fused as fused

    calls = []
    real = fused.kd_chunk
    monkeypatch.setattr(fused, "kd_chunk", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    value = compare(kdcore.create("loss", "kd", temperature=temperature),
                    kdcore.create("loss", "kd", temperature=temperature, chunk_size=4),
                    head=head, teacher_grad=False, seed=3)
    assert torch.isfinite(value)
    assert calls and max(calls) <= 4


def test_lean_kd_chunk_is_not_used_where_it_does_not_apply(monkeypatch):
    """A trainable teacher, another divergence, transforms and rkd take the general chunk."""
    import kdcore.losses.fused as fused

    monkeypatch.setattr(fused, "kd_chunk", lambda *a: pytest.fail("lean path taken"))
    hs, ht, s_head, t_head, target = models()
    for loss in (kdcore.create("loss", "kd", chunk_size=4, divergence="rkl"),
                 kdcore.create("loss", "rkd", chunk_size=4),
                 kdcore.create("loss", "kd", chunk_size=4, transforms=[{"name": "temperature", "temperature": 2.0}])):
        loss(kdcore.Outputs(hidden=hs, head=s_head), kdcore.Outputs(hidden=ht, head=t_head.requires_grad_(False)),
             target)
    trainable = nn.Linear(H + 2, V).double()
    kdcore.create("loss", "kd", chunk_size=4)(kdcore.Outputs(hidden=hs, head=s_head),
                                              kdcore.Outputs(hidden=ht, head=trainable), target)


def test_lean_kd_chunk_leaves_given_logits_untouched():
    """A teacher given as a logits tensor, a student head returning its input: the lean
    path overwrites only buffers it owns."""
    hs, ht, s_head, t_head, target = models()
    t_logits = t_head(ht).detach()
    before = t_logits.clone()
    s_logits = s_head(hs).detach().requires_grad_()
    kept = s_logits.detach().clone()
    identity = lambda z: z  # noqa: E731 - a head that returns its input
    value = kdcore.create("loss", "kd", temperature=2.0, chunk_size=4)(
        kdcore.Outputs(hidden=s_logits, head=identity), t_logits, target)
    value.backward()
    assert torch.equal(t_logits, before) and torch.equal(s_logits.detach(), kept)
    dense_s = kept.clone().requires_grad_()
    dense = kdcore.create("loss", "kd", temperature=2.0)(dense_s, before, target)
    dense.backward()
    torch.testing.assert_close(value, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s_logits.grad, dense_s.grad, rtol=1e-9, atol=1e-12)


def _kd_reference(student, teacher, temperature):
    """Sum over rows of T^2 sum_k p_k (log p_k - log q_k), from the equation, float64."""
    s, t = student.double() / temperature, teacher.double() / temperature
    logp = t - torch.logsumexp(t, -1, keepdim=True)
    logq = s - torch.logsumexp(s, -1, keepdim=True)
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return temperature ** 2 * terms.sum(), temperature * (logq.exp() - p)


def test_kd_chunk_against_the_equation():
    from kdcore.losses.fused import kd_chunk

    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 9, generator=g, dtype=torch.float64) * 3, torch.randn(6, 9, generator=g, dtype=torch.float64)
    t[:, 0] = float("-inf")  # a padded column: p = 0 there
    ref_value, ref_grad = _kd_reference(s, t, 1.7)
    value, grad = kd_chunk(s.clone(), t.clone(), 1.7)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4, 1e8]), temperature=st.sampled_from([0.5, 1.0, 4.0]),
       seed=st.integers(0, 2 ** 16))
def test_kd_chunk_is_finite_on_extreme_float32_inputs(scale, temperature, seed):
    from kdcore.losses.fused import kd_chunk

    g = torch.Generator().manual_seed(seed)
    s = torch.randn(5, 13, generator=g) * scale
    t = torch.randn(5, 13, generator=g) * scale
    value, grad = kd_chunk(s.clone(), t.clone(), temperature)
    assert torch.isfinite(value) and bool(torch.isfinite(grad).all())
    ref_value, ref_grad = _kd_reference(s, t, temperature)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-4, atol=1e-4 * temperature ** 2 * max(1.0, scale))
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5 * temperature)
