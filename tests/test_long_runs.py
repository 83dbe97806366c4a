"""Long runs: accumulation, warm-up, clipping, max_steps, mid-epoch checkpoints
(SIGKILL + resume), non-finite losses, structured token batches and FSDP."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import torch

import kdcore
from kdcore.common.errors import NonFiniteLoss
from kdcore.engine import build_trainer
from kdcore.engine.batches import Batch
from kdcore.engine.distributed import Dist
from kdcore.engine.step import micro_weights


def _load(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runs = _load("helpers_runs")
TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    kdcore.train(runs.teacher_config(epochs=1), out, quiet=True)
    return str(out / "checkpoints" / "best.pt")


def _student(teacher, **run):
    conf = runs.student_config(teacher, **run)
    conf["student"]["dropout"] = 0.0  # dropout masks depend on the micro-batch shapes
    conf["optim"].update(momentum=0.0, weight_decay=0.0)
    return conf


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.student.state_dict().items()}


def _close(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)


def _fit(conf, registry=None):
    trainer = build_trainer(conf, None, quiet=True, registry=registry)
    trainer.fit()
    return trainer


# -- accumulation ---------------------------------------------------------------------------------
def test_accumulation_equals_one_batch(teacher):
    one = _fit(_student(teacher, epochs=1))
    four = _fit(_student(teacher, epochs=1, accumulate=4))
    assert one.step == four.step
    _close(_weights(one), _weights(four), rtol=1e-5, atol=1e-6)


def test_micro_batch_weights_follow_the_kept_positions():
    target = torch.tensor([[1, -100, -100], [2, 3, 4], [5, -100, 6], [-100, -100, 7]])
    batch = Batch.of({"input_ids": torch.zeros(4, 3, dtype=torch.long)}, target)
    micros = batch.split(2)
    assert [len(m) for m in micros] == [2, 2]
    weights = micro_weights(micros, Dist())
    # 4 and 3 kept positions of 7: the mean over the step is sum_m (kept_m / 7) * mean_m
    assert [float(w) for w in weights] == pytest.approx([4 / 7, 3 / 7])
    assert micro_weights([batch], Dist()) is None


@pytest.mark.parametrize("loss", [{"name": "ce"}, {"name": "ce", "label_smoothing": 0.1}])
def test_token_level_accumulation_normalises_by_the_steps_kept_tokens(registry, loss):
    conf = {"run": {"seed": 0, "epochs": 2, "batch_size": 12, "progress": "off"},
            "data": {"name": "toy_tokens"},
            "student": {"backbone": "toy_lm", "fused": False},
            "optim": {"name": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0},
            "loss": [loss]}
    one = _fit(conf, registry)
    three = _fit({**conf, "run": {**conf["run"], "accumulate": 3}}, registry)
    _close(_weights(one), _weights(three), rtol=1e-5, atol=1e-6)
    acc = one.evaluate(one.data.val, "val")["val_acc"]
    assert 0.0 <= acc <= 1.0  # token-level accuracy over the kept positions


# -- learning rate, clipping, max_steps -----------------------------------------------------------
def test_warmup_is_linear_then_follows_the_schedule(teacher):
    trainer = build_trainer({**_student(teacher), "optim": {"lr": 0.1, "warmup_steps": 4, "lr_schedule": "cosine"}},
                            None, quiet=True)
    assert [trainer.lr_factor(1, s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert trainer.lr_factor(2, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))


def test_clip_grad_norm_bounds_the_update(teacher):
    conf = _student(teacher)
    conf["optim"].update(lr=1.0, clip_grad_norm=1e-3)
    trainer = build_trainer(conf, None, quiet=True)
    before = torch.cat([p.detach().clone().reshape(-1) for p in trainer.student.parameters()])
    trainer.train_step(next(iter(trainer.batches.epoch(torch.Generator().manual_seed(0)))))
    after = torch.cat([p.detach().reshape(-1) for p in trainer.student.parameters()])
    assert float((after - before).norm()) == pytest.approx(1e-3, rel=1e-3)


def test_max_steps_stops_the_run(tmp_path, teacher):
    summary = kdcore.train(_student(teacher, epochs=5, max_steps=20), tmp_path, quiet=True)
    assert summary["steps"] == 20 and summary["epochs"] == 2 and summary["final"]["step"] == 20


def test_a_run_stopped_by_max_steps_resumes_with_more_steps_exactly(tmp_path, teacher):
    """max_steps ends a run mid-epoch: its last.pt keeps the place (batch, running
    means, RNG) so that --resume with a larger max_steps ends bitwise where a run
    that never stopped ends, and the resumed epoch is reported once."""
    kdcore.train(_student(teacher, epochs=3, max_steps=20), tmp_path / "full", quiet=True)
    kdcore.train(_student(teacher, epochs=3, max_steps=13), tmp_path / "two", quiet=True)
    stopped = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    assert stopped["step"] == 13 and stopped["batch_in_epoch"] > 0
    kdcore.train(_student(teacher, epochs=3, max_steps=13), tmp_path / "two", ["run.max_steps=20"],
                 resume=True, quiet=True)
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("full", "two"))
    assert a["step"] == b["step"] == 20
    for k, v in a["model"].items():
        assert torch.equal(b["model"][k], v), k
    def epochs(d):
        return [json.loads(line)["epoch"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]

    assert epochs("two") == epochs("full") == sorted(set(epochs("full")))


# -- non-finite losses ----------------------------------------------------------------------------
def test_a_diverging_run_stops_and_keeps_finite_checkpoints(tmp_path, teacher):
    conf = _student(teacher, epochs=3)
    conf["optim"]["lr"] = 1e6
    with pytest.raises(NonFiniteLoss, match=r"step \d+: .*(ce|kd|total).* (nan|inf)"):
        kdcore.train(conf, tmp_path, quiet=True)
    for name in ("last.pt", "best.pt"):
        path = tmp_path / "checkpoints" / name
        if path.exists():
            state = torch.load(path, weights_only=True)["model"]
            assert all(torch.isfinite(v).all() for v in state.values())


# -- mid-epoch SIGKILL ----------------------------------------------------------------------------
def test_sigkill_mid_epoch_then_resume_is_bitwise(tmp_path, teacher):
    conf = _student(teacher, epochs=3, checkpoint_every=25, batch_size=8, log_every=10_000)
    conf["data"]["n"] = 6000  # 675 steps per epoch
    path = tmp_path / "run.toml"
    path.write_text(tomli_w.dumps(conf))
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "kdcore", "train", str(path), "--out", str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # some steps past the first checkpoint, so the run dies between two of them
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    state = torch.load(last, weights_only=True)
    assert state["batch_in_epoch"] > 0 and state["step"] % 25 == 0
    kdcore.train(path, out, resume=True, quiet=True)
    kdcore.train(path, tmp_path / "full", quiet=True)
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (tmp_path / "full", out))
    assert a["step"] == b["step"] == 3 * 675
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# -- FSDP -----------------------------------------------------------------------------------------
@pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun not installed")
def test_fsdp_two_gloo_ranks_equal_one_process(tmp_path, teacher):
    conf = _student(teacher, epochs=2, device="cpu", strategy="fsdp")
    conf["optim"].update(clip_grad_norm=0.5, warmup_steps=3)
    path = tmp_path / "s.toml"
    path.write_text(tomli_w.dumps(conf))
    kdcore.train(path, tmp_path / "one", quiet=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "kdcore", "train", str(path),
                          "--out", str(tmp_path / "two"), "--quiet"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("one", "two"))
    assert one["step"] == two["step"]
    for k, v in one["model"].items():  # a full state dict: loads in one process
        assert two["model"][k].shape == v.shape
        torch.testing.assert_close(two["model"][k], v, rtol=1e-4, atol=1e-5)
    resumed = build_trainer(path, tmp_path / "two", quiet=True)
    resumed.load_state_dict(two)
