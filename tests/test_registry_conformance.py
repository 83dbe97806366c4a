"""Every installed loss, divergence and transform follows the call conventions
(parametrised over the registry, so installed plugins are checked too)."""

from __future__ import annotations

import pytest
import torch

import kdcore
from kdcore.plugins import default_registry
from kdcore.testing import (assert_finite_with_grads, check_divergence, check_logit_loss,
                            extreme_batches, random_logits, random_targets)


def _uses_outputs(name: str) -> bool:
    return bool(getattr(default_registry().get("loss", name).factory, "uses_outputs", False))


LOGIT_LOSSES = [n for n in kdcore.available("loss") if not _uses_outputs(n)]
OUTPUT_LOSSES = [n for n in kdcore.available("loss") if _uses_outputs(n)]


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_loss_follows_the_logit_loss_conventions(name):
    check_logit_loss(kdcore.create("loss", name))


@pytest.mark.parametrize("name", OUTPUT_LOSSES or [pytest.param(None, marks=pytest.mark.skip("none installed"))])
def test_outputs_loss_is_a_module_that_names_its_taps(name):
    """A ``uses_outputs`` term (called with kdcore.Outputs) is an nn.Module whose taps the
    engine can read: ``student_taps`` / ``teacher_taps``, or a ``bind`` that sets them."""
    factory = default_registry().get("loss", name).factory
    assert isinstance(factory, type) and issubclass(factory, torch.nn.Module)
    assert callable(getattr(factory, "bind", None)) or hasattr(factory, "student_taps"), \
        f"{name}: uses_outputs = True but neither bind() nor student_taps"


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


@pytest.mark.parametrize("what", ["padded", "huge", "confident teacher", "ignored"])
def test_extreme_batches_reach_every_kind_of_extreme(what):
    from hypothesis import find, settings

    def has(batch):
        zs, zt, y = batch
        kept = y != -100
        if what == "padded":
            return bool(torch.isinf(zs).any())
        if what == "huge":
            return bool((zs.isfinite() & (zs.abs() > 1e20)).any())
        if what == "ignored":
            return bool((~kept).any())
        p = torch.softmax(zt[kept], -1)
        return bool(kept.any()) and bool((p.gather(-1, y[kept, None]) == 1).any())

    find(extreme_batches(), has, settings=settings(max_examples=2000, database=None))


def test_kd_survives_extreme_batches():
    from hypothesis import given, settings

    @settings(max_examples=30, deadline=None)
    @given(batch=extreme_batches())
    def run(batch):
        assert_finite_with_grads(kdcore.create("loss", "kd"), *batch)

    run()
