"""Every installed loss, divergence and transform follows the call conventions
(parametrised over the registry, so installed plugins are checked too)."""

from __future__ import annotations

import pytest
import torch

import kdcore
from kdcore.testing import (assert_finite_with_grads, check_divergence, check_logit_loss,
                            extreme_batches, random_logits, random_targets)


@pytest.mark.parametrize("name", kdcore.available("loss"))
def test_loss_follows_the_logit_loss_conventions(name):
    check_logit_loss(kdcore.create("loss", name))


@pytest.mark.parametrize("name", kdcore.available("divergence"))
def test_divergence_follows_the_conventions(name):
    check_divergence(kdcore.create("divergence", name))


@pytest.mark.parametrize("name", kdcore.available("transform"))
def test_transform_returns_normalised_log_probabilities(name):
    transform = kdcore.create("transform", name)
    logp = torch.log_softmax(random_logits(2, 3, 6), -1)
    logp[..., -1] = float("-inf")
    logp = torch.log_softmax(logp, -1)
    out = transform(logp, random_targets(2, 3, classes=5))
    assert out.shape == logp.shape
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 3))
    assert not torch.isnan(out).any()


def test_the_checks_catch_a_loss_that_averages_over_ignored_positions():
    class Wrong(torch.nn.Module):
        uses_teacher = False

        def forward(self, student, teacher, target):
            return torch.nn.functional.cross_entropy(
                student.reshape(-1, student.shape[-1]), target.reshape(-1).clamp(min=0))

    with pytest.raises(AssertionError):
        check_logit_loss(Wrong())


def test_the_checks_catch_a_divergence_that_is_not_zero_on_equal_inputs():
    with pytest.raises(AssertionError):
        check_divergence(lambda p, q: (p.exp() * (p - q)).sum(-1) + 1e-3)


def test_extreme_batches_are_extreme_and_the_kd_loss_survives_them():
    from hypothesis import given, settings

    seen = {"inf": False, "huge": False}

    @settings(max_examples=30, deadline=None)
    @given(batch=extreme_batches())
    def run(batch):
        zs, zt, y = batch
        seen["inf"] |= bool(torch.isinf(zs).any())
        seen["huge"] |= bool((zs.isfinite() & (zs.abs() > 1e20)).any())
        assert_finite_with_grads(kdcore.create("loss", "kd"), zs, zt, y)

    run()
    assert seen["inf"] and seen["huge"]
