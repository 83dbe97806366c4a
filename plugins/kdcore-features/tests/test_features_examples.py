"""The CIFAR-100 feature recipes (examples/features_cifar100_*.toml, both the
resnet32x4 -> resnet8x4 and the wrn_40_2 -> wrn_16_2 pairs) load, and each
feature term's taps resolve on the real zoo models and give a finite loss on
a random batch (no data, no weights; skipped without kdcore-vision)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kdcore
from kdcore import config as cfg
from kdcore.engine.taps import Tapping

pytest.importorskip("kdcore_vision.zoo", reason="kdcore-vision is not installed (the zoo models)")

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
RECIPES = sorted(EXAMPLES.glob("features_cifar100_*.toml"))


def test_both_pairs_have_every_method():
    names = {p.stem for p in RECIPES}
    methods = {n.removeprefix("features_cifar100_") for n in names if "_wrn_" not in n}
    assert len(methods) == 9 and {f"features_cifar100_wrn_{m}" for m in methods} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_taps_resolve_on_the_zoo_models(path):
    conf = cfg.load(path)
    student = kdcore.create("backbone", conf.student.backbone, num_classes=100)
    teacher = None
    if conf.teacher is not None:
        teacher = kdcore.create("backbone", conf.teacher.backbone, num_classes=100).eval()
    terms = [t for t in conf.loss if t.name != "ce"]
    assert len(terms) == 1
    term = terms[0]
    loss = kdcore.create("loss", term.name, **term.params)
    if "_wrn_" in path.stem:  # the wrn recipes name their layers
        assert loss.student_taps == term.params["student_layers"]
    loss.bind(student, teacher)
    modules = dict(student.named_modules())
    assert loss.student_taps and all(p in modules for p in loss.student_taps)
    x, idx = torch.randn(2, 3, 32, 32), torch.arange(2)
    with Tapping(student, loss.student_taps) as fs:
        zs = student(x)
    t_out = None
    if loss.uses_teacher:
        assert all(p in dict(teacher.named_modules()) for p in loss.teacher_taps)
        with torch.no_grad(), Tapping(teacher, loss.teacher_taps) as ft:
            zt = teacher(x)
        t_out = kdcore.Outputs(zt, features=ft, index=idx)
    value = loss(kdcore.Outputs(zs, features=fs, index=idx), t_out, torch.tensor([3, 7]))
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert any(p.grad is not None for p in student.parameters())
