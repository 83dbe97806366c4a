"""The batch-policy seam (kdcore.losses.policy): a registered ``[batch_policy]`` replaces each
step's batch before the forward passes, once per optimizer step, with random numbers
from the run's seed and the step only."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest
import tomli_w
import torch

import kdcore
from kdcore.engine import build_trainer
from kdcore.engine.trainer import Trainer
from kdcore.losses.policy import DECIDE, BatchPolicy, StepContext
from kdcore.losses.schedule import Progress
from kdcore.plugins import load_registry

_spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).with_name("helpers_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)


class TeacherLabels(BatchPolicy):
    """Toy policy: with probability ``p`` per step, the targets become the teacher's
    argmax (hard teacher labels); records every context it sees."""

    def __init__(self, *, p: float = 1.0):
        if not 0.0 <= p <= 1.0:
            raise kdcore.ConfigError(f"p: must be in [0, 1], got {p!r}")
        self.p, self.seen = p, []

    def __call__(self, batch, context: StepContext):
        self.seen.append((context.progress.step, context.student.training, len(batch),
                          context.teacher is not None and not context.teacher.training))
        if float(torch.rand((), generator=context.generator(DECIDE), device=context.device)) >= self.p:
            return batch
        with torch.no_grad():
            labels = context.teacher(batch.inputs).argmax(-1)
        return batch.replace(target=labels)


@kdcore.hookimpl
def register_batch_policies(register):
    register("teacher_labels", TeacherLabels)


def _registry():
    plugin = types.ModuleType("toy_policy")
    plugin.register_batch_policies = register_batch_policies
    return load_registry(env={}, entry_points=[], extra_plugins=[("toy_policy", plugin)])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    kdcore.train(runs.teacher_config(epochs=1), out, quiet=True)
    return str(out / "checkpoints" / "best.pt")


def _conf(teacher, policy=None, epochs=1, **run):
    conf = runs.student_config(teacher, epochs=epochs, **run)
    conf["student"]["dropout"] = 0.0
    conf["run"]["max_steps"] = 6
    if policy is not None:
        conf["batch_policy"] = policy
    return conf


def _trained(conf):
    trainer = build_trainer(conf, None, quiet=True, registry=_registry())
    trainer.fit()
    return trainer


def test_the_kind_is_registered():
    reg = _registry()
    assert reg.available("batch_policy") == ["teacher_labels"]
    assert "batch_policy" in kdcore.plugins.hookspecs.KINDS


def test_a_policy_that_keeps_the_batch_is_an_ordinary_run_bitwise(teacher):
    plain = _trained(_conf(teacher))
    kept = _trained(_conf(teacher, {"name": "teacher_labels", "p": 0.0}))
    assert [s[0] for s in kept.batch_policy.seen] == list(range(6))
    a, b = plain.student.state_dict(), kept.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_step_trains_on_the_policys_batch(teacher):
    trainer = build_trainer(_conf(teacher, {"name": "teacher_labels"}), None, quiet=True, registry=_registry())
    reference = build_trainer(_conf(teacher), None, quiet=True)
    batch = next(iter(trainer.batches.epoch(torch.Generator().manual_seed(0))))
    with torch.no_grad():
        relabelled = batch.replace(target=trainer.teacher(batch.inputs).argmax(-1))
    assert not torch.equal(relabelled.target, batch.target)  # the toy policy changes something
    got = trainer.train_step(batch)
    want = reference.train_step(relabelled)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    a, b = trainer.student.state_dict(), reference.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_called_once_per_step_before_the_micro_batches(teacher):
    trainer = _trained(_conf(teacher, {"name": "teacher_labels", "p": 0.5}, accumulate=2))
    assert [s[0] for s in trainer.batch_policy.seen] == list(range(6))
    assert all(training and n == 32 and teacher_eval for _, training, n, teacher_eval in trainer.batch_policy.seen)


def test_the_generator_depends_on_seed_and_step_only():
    student = torch.nn.Linear(1, 1)

    def draws(seed, step, **kw):
        ctx = StepContext(student, None, Progress(1, step, 1, 10), seed, torch.device("cpu"), **kw)
        return torch.rand(4, generator=ctx.generator(DECIDE)), torch.rand(4, generator=ctx.generator(1))

    assert all(torch.equal(a, b) for a, b in zip(draws(0, 3), draws(0, 3)))
    assert not torch.equal(draws(0, 3)[0], draws(0, 4)[0])
    assert not torch.equal(draws(0, 3)[0], draws(1, 3)[0])
    assert not torch.equal(draws(0, 3)[0], draws(0, 3)[1])  # streams differ
    assert torch.equal(draws(0, 3, rank=1)[0], draws(0, 3)[0])  # the same on every rank unless per_rank
    ctx = StepContext(student, None, Progress(1, 3, 1, 10), 0, torch.device("cpu"), rank=1)
    other = StepContext(student, None, Progress(1, 3, 1, 10), 0, torch.device("cpu"), rank=0)
    assert not torch.equal(torch.rand(4, generator=ctx.generator(1, per_rank=True)),
                           torch.rand(4, generator=other.generator(1, per_rank=True)))


def test_resume_is_exact_with_a_random_policy(teacher, tmp_path, monkeypatch):
    conf = _conf(teacher, {"name": "teacher_labels", "p": 0.5}, checkpoint_every=4, epochs=2)
    conf["run"]["max_steps"] = 0  # 2 epochs of 17 steps
    kdcore.train(conf, tmp_path / "full", quiet=True, registry=_registry())
    original = Trainer.train_step

    def stop_at_step_10(self, *args, **kwargs):
        if self.step == 10:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", stop_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        kdcore.train(conf, tmp_path / "cut", quiet=True, registry=_registry())
    monkeypatch.setattr(Trainer, "train_step", original)
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["step"] == 8
    kdcore.train(conf, tmp_path / "cut", resume=True, quiet=True, registry=_registry())
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("full", "cut"))
    assert a["step"] == b["step"] == 34
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("policy, message", [
    ({"name": "nope"}, "batch_policy.name: unknown batch_policy 'nope'"),
    ({"name": "teacher_labels", "q": 1}, "batch_policy.q: unknown parameter of batch_policy 'teacher_labels'"),
    ({"name": "teacher_labels", "p": 2.0}, "batch_policy.p: must be in [0, 1]"),
    ({"p": 2.0}, "batch_policy.name: required"),
])
def test_config_errors_name_the_key_path(teacher, policy, message):
    with pytest.raises(kdcore.ConfigError, match=r"^" + message.replace("[", r"\[").replace("]", r"\]")):
        build_trainer(_conf(teacher, policy), None, quiet=True, registry=_registry())


def test_the_cli_exits_2_on_an_unknown_policy(teacher, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(tomli_w.dumps(_conf(teacher, {"name": "nope"})))
    proc = subprocess.run([sys.executable, "-m", "kdcore", "train", str(path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "batch_policy.name: unknown batch_policy 'nope'" in lines[0]
