"""This plugin's example configs (examples/*.toml) run end to end, shortened:
a 1-epoch teacher from examples/teacher.toml, then each example (4 epochs where
a schedule switches), on a small dataset. Skipped outside a repository checkout
and where an example needs a plugin that is not installed."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

import kdcore

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
SMALL = ["data.n=600", "run.batch_size=32"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    if not (EXAMPLES / "teacher.toml").exists():
        pytest.skip("examples/ not found (not a repository checkout)")
    root = tmp_path_factory.mktemp("dkd_examples")
    kdcore.train(EXAMPLES / "teacher.toml", root / "runs" / "teacher", SMALL + ["run.epochs=1"], quiet=True)
    return root


@pytest.mark.parametrize("name", ["dkd"])
def test_example_runs(name, workdir, monkeypatch):
    path = EXAMPLES / f"{name}.toml"
    with path.open("rb") as fh:
        terms = tomllib.load(fh)["loss"]
    needed = [("loss", t["name"]) for t in terms]
    needed += [(kind, t[key]["name"]) for t in terms for kind, key in
               (("scheduler", "schedule"), ("divergence", "divergence")) if isinstance(t.get(key), dict)]
    missing = [f"{kind} {comp}" for kind, comp in needed if comp not in kdcore.available(kind)]
    if missing:
        pytest.skip(f"needs components that are not installed: {', '.join(missing)}")
    monkeypatch.chdir(workdir)
    epochs = 4 if name.endswith("switch") else 1
    summary = kdcore.train(path, workdir / "runs" / name, SMALL + [f"run.epochs={epochs}"], quiet=True)
    assert math.isfinite(summary["test_acc"]) and summary["test_acc"] > 0.4
