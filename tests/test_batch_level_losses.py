"""Batch-level logit losses (``batch_level = True``, ``batch_value``): a
DIST-style loss written here against the public base class refuses
``chunk_size``, passes the conformance checks that apply to it, equals a
float64 reference, drops ignored token positions, and takes Outputs
(projecting the kept rows only)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kdcore
from kdcore.testing import check_logit_loss, random_logits, random_targets


def _pearson(a, b, dim):
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim)).clamp(min=1e-12)


class DistLike(kdcore.LogitLoss):
    """DIST-style (Huang et al. 2022): ``1 - pearson`` between the models'
    probabilities across classes per row (inter) and across the batch per class
    (intra), the latter coupling the rows."""

    batch_level = True

    def __init__(self, *, temperature: float = 1.0, chunk_size: int | None = None):
        super().__init__(temperature=temperature, chunk_size=chunk_size)

    def batch_value(self, student, teacher, target):
        t = self.temperature
        q = torch.softmax(student / t, dim=-1)
        p = torch.softmax(teacher / t, dim=-1)
        inter = (1 - _pearson(q, p, dim=1)).mean()
        intra = (1 - _pearson(q, p, dim=0)).mean()
        return t * t * (inter + intra)


def reference(zs, zt, t=1.0):
    """The same formula in float64, written without the base class."""
    q = torch.softmax(zs.double() / t, -1)
    p = torch.softmax(zt.double() / t, -1)
    inter = 1 - torch.stack([torch.corrcoef(torch.stack([q[i], p[i]]))[0, 1] for i in range(len(q))]).mean()
    intra = 1 - torch.stack([torch.corrcoef(torch.stack([q[:, k], p[:, k]]))[0, 1]
                             for k in range(q.shape[1])]).mean()
    return t * t * (inter + intra)


def test_chunk_size_is_refused_naming_it():
    with pytest.raises(kdcore.ConfigError, match="chunk_size: DistLike is a batch-level loss .* couples"):
        DistLike(chunk_size=4)


def test_conformance_checks_that_apply_pass():
    check_logit_loss(DistLike(temperature=2.0))


def test_value_equals_a_float64_reference():
    zs, zt = random_logits(9, 6, seed=1), random_logits(9, 6, seed=2)
    value = DistLike(temperature=2.0)(zs.double(), zt.double())
    torch.testing.assert_close(value, reference(zs, zt, 2.0), rtol=1e-10, atol=1e-12)


def test_token_level_drops_the_ignored_rows():
    zs, zt = random_logits(3, 5, 7, seed=3), random_logits(3, 5, 7, seed=4)
    y = random_targets(3, 5, classes=7, seed=5, ignore_frac=0.4)
    y[0, 0] = 2
    kept = y != -100
    value = DistLike()(zs, zt, y)
    torch.testing.assert_close(value.double(), reference(zs[kept], zt[kept]), rtol=1e-5, atol=1e-6)
    s = zs.clone().requires_grad_()
    DistLike()(s, zt, y).backward()
    assert torch.all(s.grad[~kept] == 0) and s.grad[kept].abs().sum() > 0


def test_every_row_ignored_gives_zero():
    zs = random_logits(2, 3, 5).requires_grad_()
    value = DistLike()(zs, random_logits(2, 3, 5, seed=1), torch.full((2, 3), -100))
    value.backward()
    assert value.item() == 0.0 and torch.equal(zs.grad, torch.zeros_like(zs))


def test_outputs_project_only_the_kept_rows():
    g = torch.Generator().manual_seed(0)
    hs, ht = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 5, generator=g)
    s_head, t_head = nn.Linear(4, 8), nn.Linear(5, 8)
    y = random_targets(2, 6, classes=8, ignore_frac=0.3)
    y[0, 0], y[1, 1] = 1, -100
    seen = []
    s_head.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    s = kdcore.Outputs(hidden=hs, head=s_head)
    value = DistLike()(s, kdcore.Outputs(hidden=ht, head=t_head), y)
    assert seen == [int((y != -100).sum())] and not s.has_logits
    torch.testing.assert_close(value, DistLike()(s_head(hs), t_head(ht), y))
