"""Short digits runs of every feature method through the engine (its taps, bind and
shape-inference pass), the trained connectors in the checkpoint, and CRD's memory bank
surviving an interrupted run's resume exactly. Skipped without kdcore-vision."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import kdcore
from kdcore.testing import train_interrupted

pytest.importorskip("kdcore_vision", reason="kdcore-vision is not installed (digits data, zoo backbones)")

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
METHODS = ["fitnet", "at", "sp", "pkt", "relational", "vid", "crd", "reviewkd", "uskd"]
SMALL = ["data.image_size=16", "data.split=[0.3, 0.35, 0.35]", "run.batch_size=32"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    kdcore.train(EXAMPLES / "vision_digits_teacher.toml", root / "runs" / "vision_digits_teacher",
                 SMALL + ["run.epochs=1"], quiet=True)
    return root


def losses_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["losses"]


@pytest.mark.parametrize("method", METHODS)
def test_digits_recipe_runs(method, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    run = workdir / "runs" / method
    summary = kdcore.train(EXAMPLES / f"features_digits_{method}.toml", run, SMALL + ["run.max_steps=3"], quiet=True)
    assert math.isfinite(summary["test_acc"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    values = [v for r in records for k, v in r.items() if k.startswith("loss/") or k == method]
    assert all(math.isfinite(v) for v in values if isinstance(v, float))
    state = losses_state(run)
    if method in ("fitnet", "vid", "crd", "reviewkd", "uskd"):  # connectors trained and checkpointed
        assert any(k.endswith(("weight", "log_scales.0")) for k in state)
    if method == "crd":
        assert any(k.endswith("memory_student") for k in state)


def test_crd_bank_survives_resume_exactly(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    conf = EXAMPLES / "features_digits_crd.toml"
    over = SMALL + ["run.epochs=2", "optim.milestones=[1]"]
    kdcore.train(conf, workdir / "runs" / "crd_full", over, quiet=True)
    train_interrupted(conf, workdir / "runs" / "crd_cut", over, at_epoch=2)  # after one checkpointed epoch
    full, cut = losses_state(workdir / "runs" / "crd_full"), losses_state(workdir / "runs" / "crd_cut")
    assert set(full) == set(cut) and any(k.endswith("memory_teacher") for k in full)
    assert all(torch.equal(full[k], cut[k]) for k in full)
