"""End-to-end runs: run directory, resume equality, the gradient-aware seam."""

from __future__ import annotations

import importlib.util
import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch

import kdcore
from kdcore.common.errors import ConfigError
from kdcore.engine import build_trainer
from kdcore.engine import loop
from kdcore.engine.batches import Batch
from kdcore.engine.trainer import Trainer
from kdcore.losses.weighting import GradientWeighting, Update

_spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).with_name("helpers_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    kdcore.train(runs.teacher_config(), out, quiet=True)
    return str(out / "checkpoints" / "best.pt")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_run_directory(tmp_path, teacher_ckpt):
    summary = kdcore.train(runs.student_config(teacher_ckpt), tmp_path, quiet=True)
    assert (tmp_path / "config.toml").read_text().startswith("[run]")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for key in ("step", "loss/ce", "loss/kd", "weight/ce", "weight/kd", "val_acc", "val_tv", "lr"):
        assert key in records[-1], key
    assert records[0]["weight/kd"] < records[-1]["weight/kd"] <= 1.0  # linear schedule grows
    assert records[0]["lr"] == pytest.approx(0.1) and records[-1]["lr"] == pytest.approx(0.01)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["test_acc"] == summary["test_acc"] and 0.0 <= summary["test_acc"] <= 1.0
    assert summary["best_val_acc"] == max(r["val_acc"] for r in records)
    assert (tmp_path / "checkpoints" / "best.pt").exists()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert "teacher_test_acc" in summary
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["step"] == summary["steps"]


def test_same_seed_same_weights_and_interrupted_resume(tmp_path, teacher_ckpt, monkeypatch):
    conf = runs.student_config(teacher_ckpt, epochs=4)
    kdcore.train(conf, tmp_path / "full", quiet=True)
    kdcore.train(conf, tmp_path / "again", quiet=True)
    full = weights(tmp_path / "full")
    assert all(torch.equal(full[k], v) for k, v in weights(tmp_path / "again").items())

    original = loop._run_epoch

    def interrupt_at_epoch_3(trainer, *args):
        if trainer.epoch == 3:
            raise KeyboardInterrupt
        return original(trainer, *args)

    monkeypatch.setattr(loop, "_run_epoch", interrupt_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        kdcore.train(conf, tmp_path / "cut", quiet=True)
    monkeypatch.setattr(loop, "_run_epoch", original)
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 2
    kdcore.train(conf, tmp_path / "cut", resume=True, quiet=True)
    resumed = weights(tmp_path / "cut")
    assert all(torch.equal(full[k], v) for k, v in resumed.items())
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 4


def test_resume_without_checkpoint_is_a_config_error(tmp_path, teacher_ckpt):
    with pytest.raises(ConfigError, match="--resume: no checkpoint"):
        kdcore.train(runs.student_config(teacher_ckpt), tmp_path, resume=True, quiet=True)


def test_teacher_errors(tmp_path, teacher_ckpt):
    conf = runs.student_config(str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="^teacher.checkpoint: file not found"):
        build_trainer(conf, tmp_path, quiet=True)
    conf = runs.student_config(teacher_ckpt)
    conf["teacher"]["hidden"] = [7]
    with pytest.raises(ConfigError, match="^teacher.checkpoint: .* does not fit backbone 'mlp'"):
        build_trainer(conf, tmp_path, quiet=True)
    bad = tmp_path / "pickled.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": Fraction(1, 3)}, bad)
    with pytest.raises(ConfigError, match="weights_only=True"):
        build_trainer(runs.student_config(str(bad)), tmp_path, quiet=True)
    conf = runs.student_config(teacher_ckpt)
    del conf["teacher"]
    with pytest.raises(ConfigError, match="^teacher: required by loss term"):
        build_trainer(conf, tmp_path, quiet=True)


class Recording(GradientWeighting):
    """A weighting that returns plain per-term coefficients (or their gradient)."""

    needs_aux_batch = True

    def __init__(self, use_grad: bool):
        self.use_grad, self.seen = use_grad, []

    def combine(self, ctx):
        aux = ctx.aux_losses()
        self.seen.append((sorted(ctx.losses), dict(ctx.roles), sorted(aux)))
        if not self.use_grad:
            return Update(coefficients={k: 1.0 for k in ctx.losses}, info={"calls": 1.0})
        g = sum(ctx.grad(v) for v in ctx.losses.values())
        return Update(grad=g, info={"calls": 1.0})


@pytest.mark.parametrize("use_grad", [False, True])
def test_gradient_seam_matches_plain_step(tmp_path, teacher_ckpt, use_grad):
    conf = runs.student_config(teacher_ckpt)
    conf["student"]["dropout"] = 0.0
    plain = build_trainer(conf, None, quiet=True)
    seamed = build_trainer(conf, None, quiet=True)
    seamed.weighting = Recording(use_grad)
    seamed.load_state_dict(plain.state_dict())
    x, y = seamed.data.train.inputs[:32], seamed.data.train.targets[:32]
    aux = iter([Batch.of(seamed.data.train.inputs[32:64], seamed.data.train.targets[32:64])])
    plain.train_step(Batch.of(x, y))
    seamed.train_step(Batch.of(x, y), aux=aux)
    for a, b in zip(plain.student.parameters(), seamed.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert seamed.weighting.seen == [(["ce", "kd"], {"ce": "ce", "kd": "kd"}, ["ce", "kd"])]


def test_weighting_info_is_logged(tmp_path, teacher_ckpt, monkeypatch):
    trainer = build_trainer(runs.student_config(teacher_ckpt, epochs=1), tmp_path, quiet=True)
    trainer.weighting = Recording(use_grad=False)
    trainer.fit()
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["weighting/calls"] == 1.0


def test_bf16_autocast_runs(tmp_path, teacher_ckpt):
    summary = kdcore.train(runs.student_config(teacher_ckpt, epochs=1, amp="bf16"), tmp_path, quiet=True)
    assert 0.0 <= summary["test_acc"] <= 1.0


def test_steps_where_every_weight_is_zero_leave_the_student_unchanged(tmp_path):
    conf = runs.teacher_config(epochs=1)
    conf["loss"] = [{"name": "ce", "weight": 0.0}]
    trainer = build_trainer(conf, tmp_path, quiet=True)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    summary = trainer.fit()
    assert summary["steps"] > 0
    assert all(torch.equal(before[k], v) for k, v in trainer.student.state_dict().items())


def test_compile_wraps_student_and_teacher(tmp_path, teacher_ckpt, monkeypatch):
    compiled = []

    def fake_compile(module):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    trainer = build_trainer(runs.student_config(teacher_ckpt, epochs=1, compile=True), tmp_path, quiet=True)
    assert compiled == [trainer.student, trainer.teacher]
    x, y = trainer.data.train.inputs[:8], trainer.data.train.targets[:8]
    trainer.train_step(Batch.of(x, y))


def test_evaluate_reports_nll_and_the_teachers_agreement(tmp_path):
    """evaluate: mean NLL over the split against a float64 reference, and given the
    teacher's top-1 predictions (evaluate_top1) the share of samples where student and
    teacher agree on top-1."""
    import torch

    import kdcore
    from kdcore.engine import build_trainer

    conf = {"run": {"seed": 0, "epochs": 1, "batch_size": 64, "progress": "off"},
            "data": {"name": "gaussian_mixture", "n": 600}, "student": {"backbone": "mlp"},
            "optim": {"name": "sgd", "lr": 0.05}, "loss": [{"name": "ce"}]}
    kdcore.train(conf, tmp_path / "t", quiet=True)
    conf = {**conf, "teacher": {"backbone": "mlp", "checkpoint": str(tmp_path / "t/checkpoints/best.pt")},
            "loss": [{"name": "ce"}, {"name": "kd"}]}
    trainer = build_trainer(conf, None, quiet=True)
    test = trainer.data.test
    from kdcore.engine.evaluate import evaluate_top1

    _, top1 = evaluate_top1(trainer.teacher, test, "t", trainer.runtime, batch_size=trainer.config.run.eval_batch_size)
    got = trainer.evaluate(test, "test", references={"test_agreement": top1})
    x, y = test.inputs, test.targets
    with torch.no_grad():
        trainer.student.eval(), trainer.teacher.eval()
        s, t = trainer.student(x).double(), trainer.teacher(x).double()
    nll = -torch.log_softmax(s, -1).gather(-1, y.unsqueeze(-1)).mean()
    assert abs(got["test_nll"] - float(nll)) < 1e-5
    assert got["test_agreement"] == float((s.argmax(-1) == t.argmax(-1)).double().mean())
    assert "test_ppl" not in got and "test_agreement" not in trainer.evaluate(test, "test")
