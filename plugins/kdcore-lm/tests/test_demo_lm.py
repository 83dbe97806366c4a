"""``kdcore demo lm`` at a reduced size: the plugin registers it, the table's numbers are
the runs' summaries, sorted by the KL from the truth, with the truth and the teacher."""

from __future__ import annotations

import json
import math

import kdcore
from kdcore.cli.demo import find_demo
from kdcore.plugins import default_registry
from kdcore_lm import demo


def test_kdcore_demo_lm_is_the_plugins_demo():
    assert find_demo(default_registry(), "lm") is demo.run_demo


def test_demo_lm_runs_at_a_reduced_size(tmp_path, capsys):
    small = {"n": 200, "length": 8, "vocab_size": 16, "states": 4}
    rows = demo.run_demo(tmp_path, teacher_epochs=1, student_epochs=2, seeds=(1, 2), quiet=True, data=small)
    out = capsys.readouterr().out
    methods = [r["method"] for r in rows]
    assert methods[:2] == ["truth", "teacher"] and "ce" in methods and "ce + kd" in methods
    students = rows[2:]
    assert [r["kl"][0] for r in students] == sorted(r["kl"][0] for r in students)
    kls = [json.loads((tmp_path / f"student-kl-s{s}" / "summary.json").read_text())["test_kl"] for s in (1, 2)]
    kd = next(r for r in rows if r["method"] == "ce + kd")
    assert abs(kd["kl"][0] - sum(kls) / 2) < 1e-12
    line = next(line for line in out.splitlines() if line.split("  ")[0] == "ce + kd")
    assert f"{sum(kls) / 2:8.4f}" in line
    assert "than ce alone" in out and "(mean ± std over 2 seeds)" in out
    runs = [json.loads((tmp_path / f"student-kl-s{s}" / "summary.json").read_text()) for s in (1, 2)]
    for col, key in (("ppl", "test_ppl"), ("agree", "test_agreement")):
        assert abs(kd[col][0] - sum(r[key] for r in runs) / 2) < 1e-12
    assert all(abs(r["test_ppl"] - math.exp(r["test_nll"])) < 1e-9 * r["test_ppl"] for r in runs)
    # the step's peak memory (run.measure_memory; the kept tokens of the step vary with the seed)
    assert all(r["peak_step_mib"] > 0 for r in runs)
    assert abs(kd["mem"][0] - sum(r["peak_step_mib"] for r in runs) / 2) < 1e-12
    assert rows[0]["mem"] == rows[1]["mem"] == (None, None) and "step peak MiB" in out
    ce = next(r for r in rows if r["method"] == "ce")
    assert ce["agree"] == (None, None) and ce["ppl"][0] > 1.0  # a run without a teacher has no agreement
    if "ab" in kdcore.available("divergence"):
        assert "ce + kd (ab 0.2, 0.7)" in methods


def test_synthetic_lm_train_size_keeps_the_first_training_sequences():
    import pytest
    import torch

    from kdcore import ConfigError, create

    full = create("dataset", "synthetic_lm", n=100, length=6, vocab_size=8, states=3)
    few = create("dataset", "synthetic_lm", n=100, length=6, vocab_size=8, states=3, train_size=10)
    assert torch.equal(few.train.inputs["input_ids"], full.train.inputs["input_ids"][:10])
    assert torch.equal(few.train.targets, full.train.targets[:10])
    assert torch.equal(few.test.posterior, full.test.posterior)
    with pytest.raises(ConfigError, match="^train_size: 1000 is more than the 90 training sequences"):
        create("dataset", "synthetic_lm", n=100, length=6, vocab_size=8, states=3, train_size=1000)
