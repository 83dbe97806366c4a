"""Every example config is valid, and the core examples run end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

import kdcore
from kdcore import config as cfg
from kdcore.plugins import default_registry

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_is_valid(path):
    conf = cfg.load(path)
    cfg.check_components(conf, default_registry())
    from kdcore.engine.objective import Objective
    Objective.from_config(conf, default_registry())


def test_teacher_then_kd_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = ["run.epochs=1", "data.n=800"]
    teacher = kdcore.train(EXAMPLES / "teacher.toml", "runs/teacher", small, quiet=True)
    student = kdcore.train(EXAMPLES / "kd.toml", "runs/kd", small, quiet=True)
    assert teacher["test_acc"] > 0.4 and student["test_acc"] > 0.4
