"""The finiteness guard on gradients: a step whose losses are finite but whose
gradient is not stops the run (exit 1, the last finite checkpoint kept), naming
the parameter group; on accelerators the first bad step is recorded on the
device and names the real term (the device logic runs here on CPU tensors)."""

from __future__ import annotations

import importlib.util
import math
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import kdcore
from kdcore.common.errors import NonFiniteGradient, NonFiniteLoss
from kdcore.engine.gradients import SUMMED_MAX_TENSORS, FiniteGuard, gradient_checks, gradient_norms
from kdcore.plugins import load_registry

_spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).with_name("helpers_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)


class NanGradient(nn.Module):
    """From step ``after`` on, a term whose value is 0 (finite) and whose gradient is NaN:
    ``sqrt(|0 * x|)`` on the student's logits, or on its own parameter with ``own``."""

    uses_teacher = False

    def __init__(self, *, after: int = 3, own: bool = False):
        super().__init__()
        self.after, self.own = after, own
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, student, teacher, target):
        self.calls += 1
        x = self.scale * 0.0 if self.own else student.sum() * 0.0 + 0.0 * self.scale
        if int(self.calls) <= self.after:
            return x
        return x.abs().sqrt()


@kdcore.hookimpl
def register_losses(register):
    register("nan_gradient", NanGradient)


def _registry():
    plugin = types.ModuleType("toy_nan_gradient")
    plugin.register_losses = register_losses
    return load_registry(env={}, entry_points=[], extra_plugins=[("toy_nan_gradient", plugin)])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    kdcore.train(runs.teacher_config(epochs=1), out, quiet=True)
    return str(out / "checkpoints" / "best.pt")


def _conf(teacher, clip=None, **term):
    conf = runs.student_config(teacher, epochs=1, checkpoint_every=2)
    conf["loss"].append({"name": "nan_gradient", "after": 5, **term})
    if clip:
        conf["optim"]["clip_grad_norm"] = clip
    return conf


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_non_finite_student_gradient_stops_the_run_keeping_finite_checkpoints(tmp_path, teacher, clip):
    with pytest.raises(NonFiniteGradient, match=r"step 6: the gradient of the student's parameters is not finite \(nan\)"):
        kdcore.train(_conf(teacher, clip), tmp_path, quiet=True, registry=_registry())
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_term_parameter_gradient_names_the_term(tmp_path, teacher):
    with pytest.raises(NonFiniteGradient, match=r"step 6: the gradient of loss term 'nan_gradient'"):
        kdcore.train(_conf(teacher, own=True), tmp_path, quiet=True, registry=_registry())


def test_the_cli_exits_1_with_one_line(tmp_path, teacher, capsys, monkeypatch):
    import kdcore.cli

    def fail(args):
        raise NonFiniteGradient(6, "the student's parameters", math.nan)

    monkeypatch.setattr(kdcore.cli.commands, "_cmd_list", fail)
    assert kdcore.cli.main(["list"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step 6: the gradient of the student's parameters is not finite (nan)" in err[0]


def test_gradient_norms_per_group():
    a, b, c = (nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([1.0, float("inf"), 0.0])
    norms = gradient_norms([[a], [b], [c]])
    assert norms[0] == 5.0 and math.isinf(norms[1]) and norms[2] == 0.0


@pytest.mark.parametrize("tensors", [1, 3, SUMMED_MAX_TENSORS + 1])  # summed, and through the norm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_checks_are_non_finite_exactly_where_a_gradient_is(tensors, dtype):
    def group(bad=None):
        ps = [nn.Parameter(torch.zeros(4, dtype=dtype)) for _ in range(tensors)]
        for i, p in enumerate(ps):
            p.grad = torch.full((4,), 1e3 * (-1) ** i, dtype=dtype)  # sums that cancel, norms that do not
        if bad is not None:
            ps[-1].grad[1] = bad
        return ps

    empty = [nn.Parameter(torch.zeros(2))]
    checks = gradient_checks([group(), group(float("nan")), group(float("inf")), group(float("-inf")), empty])
    assert checks.shape == (5,)
    assert math.isfinite(checks[0]) and checks[4] == 0.0
    assert not checks[1:4].isfinite().any()
    # inf and -inf in one group: a sum of nan, never a finite value
    mixed = group(float("inf"))
    mixed[0].grad[0] = float("-inf")
    assert not math.isfinite(gradient_checks([mixed])[0])


def _device_guard():
    """The accelerator logic (nothing read until check), run on CPU tensors."""
    return FiniteGuard(torch.device("cuda"), terms=["ce", "kd"], groups=["the student's parameters", "loss term 'x'"])


def test_device_guard_names_the_term_and_its_value():
    guard = _device_guard()
    guard.observe_gradients(1, torch.tensor([1.0, 2.0]))
    guard.observe(1, {"ce": torch.tensor(1.0), "kd": torch.tensor(2.0)}, torch.tensor(3.0))
    guard.check()
    guard.observe_gradients(2, torch.tensor([float("nan"), 2.0]))  # the same step's loss takes precedence
    guard.observe(2, {"kd": torch.tensor(float("inf"))}, torch.tensor(float("inf")))
    guard.observe(3, {"ce": torch.tensor(float("nan"))}, torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLoss, match=r"step 2: loss term 'kd' is inf"):
        guard.check()


def test_device_guard_total_and_gradients():
    guard = _device_guard()
    guard.observe(1, {"ce": torch.tensor(1e38), "kd": torch.tensor(1e38)}, torch.tensor(float("inf")))
    with pytest.raises(NonFiniteLoss, match=r"step 1: loss term 'total' is inf"):
        guard.check()
    guard = _device_guard()
    guard.observe_gradients(4, torch.tensor([1.0, float("nan")]))
    guard.observe(4, {"ce": torch.tensor(1.0)}, torch.tensor(1.0))
    guard.observe_gradients(5, torch.tensor([float("nan"), 1.0]))
    with pytest.raises(NonFiniteGradient, match=r"step 4: the gradient of loss term 'x' is not finite \(nan\)"):
        guard.check()


def test_eager_guard_prefers_the_loss_of_the_same_step():
    guard = FiniteGuard(torch.device("cpu"), terms=["ce"], groups=["the student's parameters"])
    guard.observe_gradients(1, torch.tensor([float("nan")]))
    with pytest.raises(NonFiniteLoss, match="loss term 'ce' is nan"):
        guard.observe(1, {"ce": torch.tensor(float("nan"))}, torch.tensor(float("nan")))
    guard.observe_gradients(2, torch.tensor([1.0]))
    guard.observe(2, {"ce": torch.tensor(1.0)}, torch.tensor(1.0))  # the earlier record is gone


def test_average_gradients_takes_part_alike_on_every_process_whatever_its_gradients():
    """Two processes simulated by hand: each sends one tensor of the same length, whether it
    has a gradient for a parameter or not (a missing one counts as zero); a parameter no
    process has a gradient for keeps none."""
    from kdcore.engine import average_gradients

    def process(grads):
        params = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4)),
                  torch.nn.Parameter(torch.zeros(1))]
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        return params

    g = torch.Generator().manual_seed(0)
    a0, a1, b0 = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g), torch.randn(4, generator=g)
    ranks = [process([a0, b0, None]), process([a1, None, None])]
    sent = []  # what each process hands the collective

    flats = []  # what each should send, built by hand; the collective answers with their mean
    for rank, params in enumerate(ranks):
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        flats.append(torch.cat([*((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                  for p in params), present]))
    both = (flats[0] + flats[1]) / 2
    for rank, params in enumerate(ranks):
        average_gradients(params, lambda t, rank=rank: (sent.append((rank, t.clone())), both)[1])
        torch.testing.assert_close(params[0].grad, (a0 + a1) / 2)
        torch.testing.assert_close(params[1].grad, b0 / 2)
        assert params[2].grad is None
    assert sent[0][1].shape == sent[1][1].shape  # the same collective on both
    torch.testing.assert_close(sent[0][1], flats[0])
    torch.testing.assert_close(sent[1][1], flats[1])
    one = process([a0, None, None])
    average_gradients(one, None)  # one process: nothing to do
    assert torch.equal(one[0].grad, a0) and one[1].grad is None
