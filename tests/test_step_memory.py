"""``run.measure_memory``: the peak memory of the run's second training step
(kdcore/engine/memory.py), from the profiler's allocation record on the CPU."""

from __future__ import annotations

import sys

import pytest
import torch

import kdcore
from kdcore.engine.memory import MEASURED_STEP, StepMemory

MIB = 2**20


def _measure(fn) -> float:
    memory = StepMemory(torch.device("cpu"), enabled=True)
    with memory.around(MEASURED_STEP):
        fn()
    return memory.peak_mib


def test_the_peak_is_the_most_the_step_holds_at_once():
    def step():
        a = torch.ones(MIB // 4)            # 1 MiB
        b = torch.ones(2 * MIB // 4)        # 3 MiB live
        del a                               # 2 MiB
        c = torch.ones(MIB // 4)            # 3 MiB again, not 4
        del b, c

    assert _measure(step) == pytest.approx(3.0, abs=1e-3)


def test_tensors_older_than_the_step_do_not_count():
    old = torch.ones(8 * MIB // 4)

    def step():
        nonlocal old
        old = None                          # freed, but allocated before the step
        torch.ones(MIB // 4)

    assert _measure(step) == pytest.approx(1.0, abs=1e-3)


def test_only_the_measured_step_is_measured_and_only_when_enabled():
    on, off = StepMemory(torch.device("cpu"), True), StepMemory(torch.device("cpu"), False)
    for memory in (on, off):
        with memory.around(MEASURED_STEP - 1):
            torch.ones(MIB)
        assert memory.peak_mib is None
    with off.around(MEASURED_STEP):
        torch.ones(MIB)
    assert off.peak_mib is None


def test_python_messages_still_show_during_the_measured_step(capfd):
    def step():
        print("from the step", file=sys.stderr)

    _measure(step)
    err = capfd.readouterr().err
    assert "from the step" in err
    assert "profiler" not in err.lower() and "USDT" not in err  # the profiler's own C++ log lines


def test_a_fused_kd_step_holds_a_fraction_of_the_dense_one():
    """The measure tells the fused projection (kdcore/fused.py: a few chunk-sized
    buffers) from full logits (several logits tensors)."""
    torch.manual_seed(0)
    n, d, vocab = 1024, 32, 4096
    head = torch.nn.Linear(d, vocab, bias=False)
    teacher_head = torch.nn.Linear(d, vocab, bias=False).requires_grad_(False)  # frozen, as the engine's
    hidden = torch.randn(n, d, requires_grad=True)
    teacher_hidden = torch.randn(n, d)
    dense_kd = kdcore.create("loss", "kd", temperature=1.0)
    fused_kd = kdcore.create("loss", "kd", temperature=1.0, chunk_size=64)

    def dense():
        with torch.no_grad():
            t = teacher_head(teacher_hidden)
        dense_kd(head(hidden), t).backward()

    def fused():
        fused_kd(kdcore.Outputs(hidden=hidden, head=head),
                 kdcore.Outputs(hidden=teacher_hidden, head=teacher_head)).backward()

    logits_mib = n * vocab * 4 / MIB
    dense_peak, fused_peak = _measure(dense), _measure(fused)
    assert dense_peak > 2 * logits_mib
    assert fused_peak < 0.3 * logits_mib


def test_the_summary_reports_the_step_peak(tmp_path):
    conf = {"run": {"seed": 0, "epochs": 1, "batch_size": 64, "progress": "off", "measure_memory": True},
            "data": {"name": "gaussian_mixture", "n": 400, "num_classes": 4, "dim": 8},
            "student": {"backbone": "mlp", "hidden": [256]}, "loss": [{"name": "ce"}]}
    summary = kdcore.train(conf, tmp_path / "on", quiet=True)
    grads_mib = (8 * 256 + 256 + 256 * 4 + 4) * 4 / MIB  # the step allocates the new gradients
    assert grads_mib < summary["peak_step_mib"] < 1.0
    conf["run"]["measure_memory"] = False
    assert "peak_step_mib" not in kdcore.train(conf, tmp_path / "off", quiet=True)
