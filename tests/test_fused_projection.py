"""The fused vocabulary projection equals the dense path: values and gradients
(to both models' hidden states and to the heads' parameters) in float64, on
token-level inputs with ignored positions, for every registered divergence
through ``kd`` and for every registered logit loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kdcore
from kdcore.losses import LogitLoss
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
    hs, ht, s_head, t_head, target = models(seed, head)
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
