"""The demos' shared presentation (kdcore.cli.demo) and plugin demos (``register_demos``).

The gaussian_mixture demo itself runs end to end in tests/test_cli.py.
"""

from __future__ import annotations

import types

import pytest
import torch

import kdcore
from kdcore.cli.demo import closer, find_demo, format_table, plugin_demos, run_demo, sort_groups, verdict
from kdcore.common.errors import ConfigError
from kdcore.plugins import load_registry


def _row(method, group, tv, sd, acc=0.8):
    return {"method": method, "group": group, "tv": (tv, sd), "acc": (acc, 0.01)}


def test_closer_needs_more_than_either_spread():
    ref = _row("ce", "g", 0.10, 0.01)
    assert closer(_row("kd", "g", 0.08, 0.01), ref, "tv")
    assert not closer(_row("kd", "g", 0.095, 0.001), ref, "tv")  # within the baseline's spread
    assert not closer(_row("kd", "g", 0.08, 0.03), ref, "tv")  # within the method's spread
    assert not closer(_row("kd", "g", 0.12, 0.0), ref, "tv")  # farther


def test_verdict_names_exactly_the_methods_beyond_the_spread():
    ce = _row("ce", "a", 0.13, 0.007)
    rows = [_row("ce + kd", "a", 0.06, 0.006), ce, _row("ce + x", "a", 0.125, 0.007),
            _row("ce + kd (transfer)", "b", 0.05, 0.002)]
    line = verdict(rows, ce, "tv", "the truth")
    assert line == ("closer to the truth than ce alone by more than the seeds' spread: ce + kd, "
                    "ce + kd (transfer); the other differences are within the spread")
    assert verdict([ce, rows[2]], ce, "tv", "the truth").startswith("no distillation method is closer")
    assert "other differences" not in verdict([ce, rows[0]], ce, "tv", "the truth")


def test_sort_groups_and_table_layout():
    rows = [_row("ref", None, 0.0, 0.0), _row("ce", "a", 0.13, 0.01), _row("ce + kd", "a", 0.06, 0.01),
            _row("ce + kd (transfer)", "b", 0.05, 0.0)]
    ordered = sort_groups(rows, "tv")
    assert [r["method"] for r in ordered] == ["ref", "ce + kd", "ce", "ce + kd (transfer)"]
    text = format_table(ordered, (("acc", "test acc"), ("tv", "TV")), 3).splitlines()
    assert text[0].startswith("method") and "(mean ± std over 3 seeds)" in text[0]
    assert text[3] == "a:" and text[6] == "b:"
    assert text[4].split() == ["ce", "+", "kd", "0.8000", "±", "0.0100", "0.0600", "±", "0.0100"]


FAKE_DEMO = types.ModuleType("fake_demo_plugin")


@kdcore.hookimpl
def register_demos(register):
    def run(out_dir, *, quiet=False):
        print(f"fake demo in {out_dir}")
        return []
    register("fake", run)


FAKE_DEMO.register_demos = register_demos


def test_a_plugin_registers_a_demo(tmp_path, capsys):
    reg = load_registry(env={"KDCORE_PLUGINS": ""}, extra_plugins=[("fake", FAKE_DEMO)])
    assert sorted(plugin_demos(reg)) == ["fake"]
    find_demo(reg, "fake")(tmp_path, quiet=True)
    assert f"fake demo in {tmp_path}" in capsys.readouterr().out
    assert find_demo(reg, None) is run_demo
    with pytest.raises(ConfigError, match=r"^demo 'other': no installed plugin provides it \(installed demos: fake\)"):
        find_demo(reg, "other")
    with pytest.raises(ConfigError, match=r"^demo 'lm' comes with kdcore-lm, which is not installed: pip install"):
        find_demo(reg, "lm")


class _PlainModuleLoss(torch.nn.Module):
    """A logit loss that is a plain module, not a LogitLoss (as ``uld`` of kdcore-lm)."""

    uses_target = False

    def forward(self, student, teacher, target=None):
        return (student - teacher).abs().mean()


class _FeatureLoss(torch.nn.Module):
    uses_outputs = True

    def forward(self, student, teacher, target=None):
        return student.features["0"].mean()


class _Supervised(torch.nn.Module):
    uses_teacher = False

    def forward(self, student, teacher, target=None):
        return student.mean()


def _needs_size(size):
    return _PlainModuleLoss()


DEMO_LOSSES = types.ModuleType("demo_losses_plugin")


@kdcore.hookimpl
def register_losses(register):
    register("plain", _PlainModuleLoss)
    register("feat", _FeatureLoss)
    register("supervised", _Supervised)
    register("sized", _needs_size)


DEMO_LOSSES.register_losses = register_losses


def test_demo_gives_every_loss_a_row_or_a_true_reason(tmp_path, capsys, monkeypatch):
    """Every loss is in exactly one of: the table's labelled rows, a ``skipping`` line."""
    import kdcore.cli.demo as demo
    import kdcore.engine

    reg = load_registry(env={"KDCORE_PLUGINS": ""}, extra_plugins=[("demo_losses", DEMO_LOSSES)])
    summary = {"test_tv": 0.1, "test_acc": 0.8, "teacher_test_tv": 0.05, "teacher_test_acc": 0.9}
    trained = []
    monkeypatch.setattr(demo, "default_registry", lambda: reg)
    monkeypatch.setattr(kdcore.engine, "train", lambda conf, out, **kw: trained.append(conf) or dict(summary))
    rows = run_demo(tmp_path, seeds=(1,), transfer=100)
    err = capsys.readouterr().err.splitlines()
    skips = dict(line.removeprefix("[demo] skipping ").split(": ", 1) for line in err
                 if line.startswith("[demo] skipping "))
    labelled = {r["method"].removeprefix("ce + ") for r in rows if r["group"] and "transfer" not in r["group"]}
    assert sorted([*skips, *labelled]) == reg.available("loss")
    assert labelled == {"ce", "kd", "rkd", "plain"}
    assert skips == {
        "feat": "a feature loss: it matches the models' intermediate features, and this demo compares what "
                "students learn from soft labels alone",
        "supervised": "it uses no teacher (the supervised baseline here is ce)",
        "sized": "it needs parameters (size: required parameter missing (loss 'sized' takes: size))"}
    transfer = {r["method"] for r in rows if r["group"] and "transfer" in r["group"]}
    assert transfer == {"ce + kd (transfer)", "ce + rkd (transfer)", "ce + plain (transfer)"}
    assert {c["loss"][-1]["name"] for c in trained if len(c["loss"]) > 1} == {"kd", "rkd", "plain"}
