"""Every installed component of every kind follows the conventions of its kind:
``kdcore.testing.check_component`` over the registry (installed plugins are
checked too), with a batch-level loss written here installed alongside."""

from __future__ import annotations

import pytest
import torch

import kdcore
from kdcore.common.errors import ConfigError
from kdcore.data import DataSplits, TensorSplit
from kdcore.losses.weighting import GradientWeighting, Update
from kdcore.plugins import load_registry
from kdcore.testing import (CHECKED_KINDS, assert_finite_with_grads, check_backbone, check_component,
                            check_dataset, check_divergence, check_logit_loss, check_outputs_loss, check_schedule,
                            check_transform, check_weighting, extreme_batches)

#: backbones with more parameters than this are checked for shapes only (built on the meta device)
FULL_CHECK_PARAMETERS = 1_000_000


class _Pearson(kdcore.LogitLoss):
    """A batch-level loss (1 - Pearson correlation across the batch per class), so
    that the conformance run always covers one (docs/plugins.md, "Batch-level losses")."""

    batch_level = True

    def batch_value(self, student, teacher, target):
        q, p = torch.softmax(student, -1), torch.softmax(teacher, -1)
        q, p = q - q.mean(0), p - p.mean(0)
        return (1 - (q * p).sum(0) / (q.norm(dim=0) * p.norm(dim=0)).clamp(min=1e-12)).mean()


class _ConformancePlugin:
    @kdcore.hookimpl
    def register_losses(self, register):
        register("conformance_pearson", _Pearson)


REGISTRY = load_registry(extra_plugins=[("conformance", _ConformancePlugin())])
COMPONENTS = [pytest.param(kind, name, id=f"{kind}:{name}")
              for kind in CHECKED_KINDS for name in REGISTRY.available(kind)]


def _check_backbone(name: str) -> None:
    factory = REGISTRY.get("backbone", name).factory
    shapes = [getattr(factory, "testing_input_shape", None)] if hasattr(factory, "testing_input_shape") \
        else [None, (3, 224, 224)]
    for shape in shapes:  # the default input, then ImageNet-sized (vision transformers need it)
        try:
            model = check_backbone(factory, input_shape=shape, device="meta")
            break
        except (RuntimeError, AssertionError, ValueError) as exc:
            error = exc
    else:
        if "meta tensor" in str(error):
            pytest.skip(f"{name} cannot be built on the meta device ({error})")
        raise error
    if sum(p.numel() for p in model.parameters()) <= FULL_CHECK_PARAMETERS:
        check_backbone(factory, input_shape=shape)


@pytest.mark.parametrize(("kind", "name"), COMPONENTS)
def test_component_follows_the_conventions_of_its_kind(kind, name):
    try:
        if kind == "backbone":
            _check_backbone(name)
        else:
            check_component(kind, name, registry=REGISTRY)
    except ConfigError as exc:  # needs parameters or local files the component did not give in testing_params
        pytest.skip(f"{kind} {name!r} cannot be built with its testing_params: {exc}")


def test_a_batch_level_loss_is_among_the_checked():
    assert any(getattr(REGISTRY.get("loss", n).factory, "batch_level", False) for n in REGISTRY.available("loss"))


def test_a_declared_skip_skips_exactly_that_check():
    class NoBf16(kdcore.LogitLoss):
        """KD-like, but refusing bfloat16 inputs (the only check it fails)."""

        def rows(self, student, teacher, target):
            return (torch.softmax(teacher, -1) * (torch.log_softmax(teacher, -1) - torch.log_softmax(student, -1))).sum(-1)

        def forward(self, student, teacher=None, target=None):
            if torch.is_tensor(student) and student.dtype == torch.bfloat16:
                raise TypeError("no bfloat16")
            return super().forward(student, teacher, target)

    with pytest.raises(TypeError, match="no bfloat16"):
        check_logit_loss(NoBf16())
    NoBf16.testing_skips = {"chunking"}
    with pytest.raises(TypeError, match="no bfloat16"):
        check_logit_loss(NoBf16())
    NoBf16.testing_skips = {"bfloat16"}
    check_logit_loss(NoBf16())
    check_logit_loss(NoBf16(), skip={"bfloat16"})


def test_a_skip_name_no_check_has_is_an_error():
    with pytest.raises(ValueError, match="no loss check is named 'bf16'.*bfloat16"):
        check_logit_loss(kdcore.create("loss", "kd"), skip={"bf16"})


def test_the_checks_catch_a_transform_that_fills_the_padding():
    def smooth_everything(logp, target):
        return torch.log(0.9 * logp.exp() + 0.1 / logp.shape[-1])

    with pytest.raises(AssertionError, match="-inf"):
        check_transform(smooth_everything)


def test_the_checks_catch_a_schedule_that_counts_its_calls():
    class Counting:
        def __init__(self):
            self.calls = 0

        def __call__(self, progress):
            self.calls += 1
            return min(self.calls / 10, 1.0)

    with pytest.raises(AssertionError, match="backwards"):
        check_schedule(Counting(), skip={"deterministic"})
    with pytest.raises(AssertionError, match="int or float|returns a float"):
        check_schedule(lambda p: torch.tensor(1.0))


def test_the_checks_catch_a_weighting_with_non_finite_coefficients():
    class Broken(GradientWeighting):
        def combine(self, ctx):
            return Update(coefficients={"ce": float("nan"), "kd": 1.0})

    with pytest.raises(AssertionError, match="non-finite"):
        check_weighting(Broken())


def test_the_checks_catch_a_backbone_with_the_wrong_number_of_classes():
    def backbone(num_classes, in_features):
        return torch.nn.Linear(in_features, num_classes + 1)

    with pytest.raises(AssertionError, match="num_classes=5"):
        check_backbone(backbone)
    with pytest.raises(AssertionError, match="num_classes=5"):
        check_backbone(backbone, device="meta")


def test_the_checks_catch_a_dataset_with_a_target_out_of_range():
    def dataset():
        x, y = torch.arange(12.0).reshape(6, 2), torch.tensor([0, 1, 2, 0, 1, 3])
        return DataSplits(TensorSplit(x, y), None, None, num_classes=3, input_shape=(2,))

    with pytest.raises(AssertionError, match="outside"):
        check_dataset(dataset)
    check_dataset(dataset, skip={"targets"})


def test_the_checks_catch_a_feature_loss_that_does_not_reduce():
    class PerSample(torch.nn.Module):
        uses_outputs = True
        student_taps, teacher_taps = ["stages.2"], ["stages.2"]

        def forward(self, student, teacher, target):
            fs, ft = student.features["stages.2"].mean((1, 2, 3)), teacher.features["stages.2"].mean((1, 2, 3))
            return (fs - ft).pow(2)

    with pytest.raises(AssertionError, match="0-dim"):
        check_outputs_loss(PerSample())
    with pytest.raises(ConfigError, match="student tap 'stage9'"):
        PerSample.student_taps = ["stage9"]
        check_outputs_loss(PerSample())


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
