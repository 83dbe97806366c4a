"""Every example config is valid, and every example that distils from
examples/teacher.toml's teacher runs end to end (shortened) with whatever
plugins are installed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import kdcore
from kdcore import config as cfg
from kdcore.plugins import default_registry

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.toml"))
#: examples whose teacher is the one examples/teacher.toml trains (those reading a teacher
#: store need a capture first: tests/test_capture.py runs examples/store_kd.toml)
STUDENTS = [p for p in CONFIGS if 'checkpoint = "runs/teacher/' in p.read_text()
            and 'source = "store"' not in p.read_text()]
SMALL = ["data.n=600", "run.batch_size=32"]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_is_valid(path):
    conf = cfg.load(path)
    cfg.check_components(conf, default_registry())
    from kdcore.engine.objective import Objective
    Objective.from_config(conf, default_registry())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    summary = kdcore.train(EXAMPLES / "teacher.toml", root / "runs" / "teacher", SMALL + ["run.epochs=1"],
                           quiet=True)
    assert summary["test_acc"] > 0.4
    return root


def test_students_are_found():
    assert {"kd.toml", "dkd.toml", "tand_switch.toml"} <= {p.name for p in STUDENTS}


@pytest.mark.parametrize("path", STUDENTS, ids=[p.stem for p in STUDENTS])
def test_distillation_example_runs(path, workdir, monkeypatch):
    try:
        cfg.check_components(cfg.load(path), default_registry())
    except kdcore.ConfigError as exc:  # names the unknown component and its key path
        if ": unknown " not in str(exc):
            raise
        pytest.skip(f"needs a plugin that is not installed: {exc}")
    monkeypatch.chdir(workdir)
    epochs = 4 if "switch" in path.stem else 1  # past the switch epoch
    summary = kdcore.train(path, workdir / "runs" / path.stem, SMALL + [f"run.epochs={epochs}"], quiet=True)
    assert math.isfinite(summary["test_acc"]) and summary["test_acc"] > 0.4
