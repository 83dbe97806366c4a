"""The ``ctkd`` transform (Li et al., AAAI 2023, "Curriculum Temperature for Knowledge
Distillation"): one step's gradients against a float64 hand computation, the cosine
curriculum, the bounds, dkd, and a ``kdcore train`` resume that keeps the temperature."""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import kdcore
from kdcore.common.errors import ConfigError
from kdcore.losses import LogitLoss
from kdcore.losses.schedule import Progress
from kdcore.testing import assert_finite_with_grads, check_transform, extreme_batches, train_interrupted

_spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).with_name("helpers_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)

Y = torch.tensor([2, -100, 0, 4, 1, -100])


def lam(n: float, epochs: float, low: float = 0.0, high: float = 1.0) -> float:
    """The paper's cosine curriculum: the reversal strength after ``n`` epochs."""
    return low + 0.5 * (high - low) * (1 + math.cos(math.pi * (1 + min(n, epochs) / epochs)))


def kd_tau(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``tau^2 KL(softmax(t / tau) || softmax(s / tau))`` per row, mean over kept rows (float64)."""
    log_p, log_q = torch.log_softmax(t / tau, -1), torch.log_softmax(s / tau, -1)
    scale = tau.reshape(-1) if tau.dim() else tau  # per row ([n, 1] -> [n]) or global
    rows = scale ** 2 * (log_p.exp() * (log_p - log_q)).sum(-1)
    return rows[y != -100].mean()


def inputs(seed: int = 0, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(6, classes, generator=g, dtype=torch.float64),
            3 * torch.randn(6, classes, generator=g, dtype=torch.float64))


def test_global_temperature_one_step_against_the_hand_computation():
    s, t = inputs()
    ctkd = kdcore.create("transform", "ctkd", init=3.0, epochs=4).double()
    ctkd.set_progress(Progress(epoch=2, step=6, epochs=8, steps_per_epoch=4))  # 1.5 epochs done
    loss = kdcore.create("loss", "kd", temperature=1.0, transforms=[ctkd])
    x = s.clone().requires_grad_()
    loss(x, t, Y).backward()

    raw = ctkd.raw.detach().clone().requires_grad_()
    x_ref = s.clone().requires_grad_()
    ref = kd_tau(x_ref, t, Y, 1.0 + 20.0 * torch.sigmoid(raw))
    g_s, g_raw = torch.autograd.grad(ref, [x_ref, raw])
    assert float(1.0 + 20.0 * torch.sigmoid(raw.detach())) == pytest.approx(3.0)
    torch.testing.assert_close(x.grad, g_s, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ctkd.raw.grad, -lam(1.5, 4) * g_raw, rtol=1e-10, atol=1e-12)
    assert lam(1.5, 4) > 0 and ctkd.raw.grad * g_raw < 0  # the temperature ascends the loss


def test_instance_temperature_one_step_against_the_hand_computation():
    s, t = inputs(1)
    ctkd = kdcore.create("transform", "ctkd", mode="instance", hidden=7, epochs=10).double()
    ctkd.set_progress(Progress(epoch=8, step=70, epochs=20, steps_per_epoch=10))  # 7 epochs done
    loss = kdcore.create("loss", "kd", temperature=1.0, transforms=[ctkd])
    x = s.clone().requires_grad_()
    loss(x, t, Y).backward()
    first, last = ctkd.mlp[0], ctkd.mlp[2]

    w1, b1, w2, b2 = (p.detach().clone().requires_grad_() for p in (first.weight, first.bias, last.weight, last.bias))
    x_ref = s.clone().requires_grad_()
    features = torch.cat([torch.log_softmax(t, -1), torch.log_softmax(s, -1)], -1)  # detached inputs
    raw = F.linear(torch.relu(F.linear(features, w1, b1)), w2, b2)
    tau = 1.0 + 20.0 * torch.sigmoid(raw)  # [n, 1]
    ref = kd_tau(x_ref, t, Y, tau)
    grads = torch.autograd.grad(ref, [x_ref, w1, b1, w2, b2])
    torch.testing.assert_close(x.grad, grads[0], rtol=1e-10, atol=1e-12)
    for p, g in zip((first.weight, first.bias, last.weight, last.bias), grads[1:]):
        torch.testing.assert_close(p.grad, -lam(7, 10) * g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["global", "instance"])
def test_dkd_with_ctkd_is_tau_squared_dkd_on_softened_logits(mode):
    if "dkd" not in kdcore.available("loss"):
        pytest.skip("kdcore-dkd is not installed")
    s, t = inputs(2)
    y = torch.tensor([2, 1, 0, 4, 1, 3])
    ctkd = kdcore.create("transform", "ctkd", mode=mode, hidden=4).double()
    ctkd.set_progress(Progress(epoch=5, step=40, epochs=10, steps_per_epoch=10))
    loss = kdcore.create("loss", "dkd", temperature=1.0, transforms=[ctkd])
    x = s.clone().requires_grad_()
    value = loss(x, t, y)
    tau = ctkd.temperature(torch.log_softmax(t, -1), torch.log_softmax(s, -1)).detach()
    plain = kdcore.create("loss", "dkd", temperature=1.0)
    rows = [tau.reshape(-1)[i] ** 2 * plain(s[i:i + 1] / tau.reshape(-1)[i], t[i:i + 1] / tau.reshape(-1)[i],
                                            y[i:i + 1]) for i in range(6)] if mode == "instance" else \
        [tau ** 2 * plain(s / tau, t / tau, y)]
    torch.testing.assert_close(value, torch.stack(rows).mean(), rtol=1e-10, atol=1e-12)
    value.backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in ctkd.parameters())


def test_the_cosine_curriculum_from_zero_to_lambda_max():
    ctkd = kdcore.create("transform", "ctkd", epochs=4, lambda_max=2.0)
    assert ctkd.strength == 0.0  # before any progress: lambda_min
    seen = []
    for step in (0, 5, 10, 20, 30, 40, 100):
        ctkd.set_progress(Progress(epoch=step // 10 + 1, step=step, epochs=10, steps_per_epoch=10))
        seen.append(ctkd.strength)
    assert seen == pytest.approx([lam(n, 4, 0.0, 2.0) for n in (0, 0.5, 1, 2, 3, 4, 10)])
    assert seen[0] == 0.0 and seen[3] == pytest.approx(1.0) and seen[-2] == seen[-1] == pytest.approx(2.0)


def test_the_temperature_stays_within_the_bounds_and_starts_at_init():
    ctkd = kdcore.create("transform", "ctkd", init=4.0)
    assert float(ctkd.temperature(torch.zeros(1, 3), torch.zeros(1, 3)).detach()) == pytest.approx(4.0)
    with torch.no_grad():
        for raw in (-1e4, 1e4):
            ctkd.raw.fill_(raw)
            tau = float(ctkd.temperature(torch.zeros(1, 3), torch.zeros(1, 3)).detach())
            assert 1.0 <= tau <= 21.0
    assert float(kdcore.create("transform", "ctkd").temperature(torch.zeros(1, 3), torch.zeros(1, 3)).detach()) == \
        pytest.approx(1 + 20 / (1 + math.exp(-1)))  # the authors' start, raw = 1


@pytest.mark.parametrize(("params", "message"), [
    ({"init": 21.0}, "init: must be in (1, 21) (t_min, t_min + t_range), got 21.0"),
    ({"mode": "row"}, "mode: must be one of 'global', 'instance', got 'row'"),
    ({"lambda_min": 1.0, "lambda_max": 0.5}, "lambda_max: must be >= lambda_min (1), got 0.5"),
])
def test_bad_parameters_are_one_line_config_errors(params, message):
    with pytest.raises(ConfigError) as info:
        kdcore.create("loss", "kd", transforms=[{"name": "ctkd", **params}])
    assert str(info.value) == f"transforms[0].{message}"


class BatchKL(LogitLoss):
    """A batch-level loss: the KL of the batch's mean distributions."""

    batch_level = True

    def batch_value(self, student, teacher, target):
        p = torch.softmax(teacher, -1).mean(0)
        return (p * (p.log() - torch.softmax(student, -1).mean(0).log())).sum()


def test_a_per_row_scale_on_a_batch_level_loss_is_a_config_error():
    s, t = inputs(3)
    with pytest.raises(ConfigError) as info:
        BatchKL(transforms=[{"name": "ctkd", "mode": "instance"}])(s.float(), t.float(), None)
    assert str(info.value) == ("transforms: BatchKL is a batch-level loss, so a transform's scale must be "
                               "one number, not one per row (use a global mode)")
    ctkd = kdcore.create("transform", "ctkd", init=2.0).double()
    value = BatchKL(transforms=[ctkd])(s, t, None)
    tau = 1.0 + 20.0 * torch.sigmoid(ctkd.raw.detach())  # 2 up to the float32 rounding of raw
    assert float(tau) == pytest.approx(2.0)
    by_hand = tau ** 2 * BatchKL()(torch.log_softmax(s, -1) / tau, torch.log_softmax(t, -1) / tau)
    torch.testing.assert_close(value, by_hand, rtol=1e-10, atol=1e-12)


def test_a_config_error_in_the_chain_names_the_key_path(tmp_path, capsys):
    conf = runs.teacher_config(1)
    conf["teacher"] = {"backbone": "mlp", "hidden": [8]}
    conf["loss"] = [{"name": "ce"}, {"name": "kd", "transforms": [{"name": "ctkd", "mode": "row"}]}]
    code, err = runs.cli(capsys, "train", str(runs.write(tmp_path / "c.toml", conf)), "--out", str(tmp_path / "o"))
    assert code == 2
    assert runs.one_line(err) == ("kdcore: error: loss[1].transforms[0].mode: must be one of 'global', 'instance', "
                                  "got 'row'")


# -- training ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ctkd_teacher")
    kdcore.train(runs.teacher_config(1), out, quiet=True)
    return str(out / "checkpoints" / "best.pt")


def _ctkd_config(ckpt: str) -> dict:
    conf = runs.student_config(ckpt, epochs=3)
    conf["loss"] = [{"name": "ce"},
                    {"name": "kd", "temperature": 1.0,
                     "transforms": [{"name": "ctkd", "mode": "instance", "hidden": 8, "init": 4.0, "epochs": 2}]}]
    return conf


def _last(path: Path) -> dict:
    return torch.load(path / "checkpoints" / "last.pt", weights_only=True)


def test_the_temperature_trains_checkpoints_and_resumes_exactly(tmp_path, teacher_ckpt):
    conf = _ctkd_config(teacher_ckpt)
    kdcore.train(conf, tmp_path / "full", quiet=True)
    full = _last(tmp_path / "full")
    bias = full["losses"]["kd.transform_modules.0.mlp.2.bias"]
    assert bias.item() != pytest.approx(math.log(3 / 17))  # trained away from init = 4

    train_interrupted(conf, tmp_path / "cut", at_epoch=2)
    resumed = _last(tmp_path / "cut")
    for part in ("model", "losses"):
        assert resumed[part].keys() == full[part].keys()
        assert all(torch.equal(full[part][k], v) for k, v in resumed[part].items()), part


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists() and shutil.which("torchrun") is None,
                    reason="torchrun not installed")
def test_two_gloo_ranks_train_the_temperature_like_one_process(tmp_path, teacher_ckpt):
    """Under DDP the temperature's gradients are averaged like the student's: two ranks
    with half the batch each end with the one-process temperature."""
    conf = _ctkd_config(teacher_ckpt)
    conf["run"].update(epochs=1, device="cpu")
    conf["student"]["dropout"] = 0.0  # dropout masks differ per rank by design
    path = runs.write(tmp_path / "c.toml", conf)
    kdcore.train(path, tmp_path / "one", quiet=True)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "kdcore", "train", str(path),
                          "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = _last(tmp_path / "one")["losses"], _last(tmp_path / "two")["losses"]
    assert one.keys() == two.keys() and "kd.transform_modules.0.mlp.2.bias" in one
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(batch=extreme_batches(), mode=st.sampled_from(["global", "instance"]), chunk_size=st.sampled_from([None, 2]))
def test_kd_with_ctkd_is_finite_on_extreme_float32_inputs(batch, mode, chunk_size):
    s, t, y = batch
    ctkd = kdcore.create("transform", "ctkd", mode=mode, hidden=4)
    ctkd.set_progress(Progress(epoch=3, step=25, epochs=10, steps_per_epoch=10))
    loss = kdcore.create("loss", "kd", temperature=1.0, chunk_size=chunk_size, transforms=[ctkd])
    assert_finite_with_grads(loss, s, t, y)  # the value, and the logits' gradients
    value = loss(s, t, y)
    grads = torch.autograd.grad(value, loss.trained_parameters(), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_the_conformance_check_catches_a_temperature_divided_into_padding(monkeypatch):
    """``-inf / tau`` has an infinite derivative in tau: the padded column must stay out of the division."""
    from kdcore.builtin import transforms

    check_transform(kdcore.create("transform", "ctkd"))
    monkeypatch.setattr(transforms, "_soften", lambda logp, tau: torch.log_softmax(logp / tau, -1))
    with pytest.raises(AssertionError, match="non-finite gradients of the transform's parameters"):
        check_transform(kdcore.create("transform", "ctkd"))
