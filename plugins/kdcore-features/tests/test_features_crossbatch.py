"""A feature term that owns trainable parameters (fitnet's connector) under the
cross-batch gradient weighting of kdcore-schedulers: the scheduler's update covers
the student only, and the connector still gets its gradient (scaled by its term's
coefficient), moves, and an interrupted run resumes to the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kdcore
from kdcore.engine import build_trainer
from kdcore.testing import train_interrupted

pytest.importorskip("kdcore_vision", reason="kdcore-vision is not installed (digits data, zoo backbones)")
pytest.importorskip("kdcore_schedulers", reason="kdcore-schedulers is not installed (crossbatch)")

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
SMALL = ["data.image_size=16", "data.split=[0.3, 0.35, 0.35]", "run.batch_size=32", "run.progress=off"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("crossbatch_features")
    kdcore.train(EXAMPLES / "vision_digits_teacher.toml", root / "runs" / "vision_digits_teacher",
                 SMALL + ["run.epochs=1"], quiet=True)
    return root


def _overrides(every: int) -> list[str]:
    return SMALL + ["run.epochs=2", "optim.milestones=[1]", "weighting.name=crossbatch", f"weighting.every={every}",
                    "weighting.mode=align"]


@pytest.mark.parametrize("every", [1, 2])
def test_connector_trains_under_crossbatch(workdir, monkeypatch, every):
    monkeypatch.chdir(workdir)
    trainer = build_trainer(EXAMPLES / "features_digits_fitnet.toml", None,
                            _overrides(every) + ["run.max_steps=4"], quiet=True)
    params = [p for p in trainer.objective.modules.parameters() if p.requires_grad]
    assert params and trainer.weighting is not None
    before = [p.detach().clone() for p in params]
    batch = next(iter(trainer.batches.epoch(torch.Generator().manual_seed(0))))
    aux = iter(trainer.batches.epoch(torch.Generator().manual_seed(1)))
    for _ in range(3):
        trainer.train_step(batch, None, aux)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, params))


def test_crossbatch_with_a_connector_resumes_exactly(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    conf = EXAMPLES / "features_digits_fitnet.toml"
    kdcore.train(conf, workdir / "runs" / "full", _overrides(2), quiet=True)
    train_interrupted(conf, workdir / "runs" / "cut", _overrides(2), at_epoch=2)
    full, cut = (torch.load(workdir / "runs" / d / "checkpoints" / "last.pt", weights_only=True)
                 for d in ("full", "cut"))
    assert full["step"] == cut["step"]
    for part in ("model", "losses"):
        assert set(full[part]) == set(cut[part]) and full[part]
        assert all(torch.equal(full[part][k], cut[part][k]) for k in full[part]), part
