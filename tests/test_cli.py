"""The command line: exit codes 0 / 2 / 1, one-line errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import tomli_w

import kdcore
from kdcore.common.errors import RunFailure

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).with_name("helpers_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)


def kdcore_cli(*args, cwd=None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "kdcore", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout)


def write(path, conf):
    path.write_text(tomli_w.dumps(conf))
    return path


def test_train_then_distil_from_the_command_line(tmp_path):
    teacher = write(tmp_path / "teacher.toml", runs.teacher_config(epochs=1))
    out = kdcore_cli("train", str(teacher), "--out", str(tmp_path / "t"), "--quiet")
    assert out.returncode == 0, out.stderr
    assert "test_acc" in out.stdout
    ckpt = str(tmp_path / "t" / "checkpoints" / "best.pt")
    student = write(tmp_path / "student.toml", runs.student_config(ckpt, epochs=1))
    out = kdcore_cli("train", str(student), "--out", str(tmp_path / "s"), "--set", "loss[1].temperature=3")
    assert out.returncode == 0, out.stderr
    assert "temperature = 3" in (tmp_path / "s" / "config.toml").read_text()
    assert "epoch 1/1" in out.stderr  # plain progress lines when not on a terminal


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["loss"][1].__setitem__("temperature", -1.0), "loss[1].temperature: must be > 0"),
    (lambda c: c["run"].__setitem__("epochz", 1), "run.epochz: unknown key"),
    (lambda c: c["loss"][1].__setitem__("name", "kdd"), "loss[1].name: unknown loss 'kdd'"),
    (lambda c: c["teacher"].__setitem__("checkpoint", "/nonexistent/t.pt"), "teacher.checkpoint: file not found"),
    (lambda c: c["data"].__setitem__("n", "many"), "data.n: must be a positive integer"),
])
def test_config_errors_exit_2_with_one_line(tmp_path, mutate, expected):
    conf = runs.student_config("/nonexistent/t.pt" if "checkpoint" in expected else str(tmp_path / "x.pt"))
    mutate(conf)
    out = kdcore_cli("train", str(write(tmp_path / "bad.toml", conf)), "--out", str(tmp_path / "o"))
    assert out.returncode == 2
    assert expected in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_usage_errors_exit_2(tmp_path):
    assert kdcore_cli("train").returncode == 2
    assert kdcore_cli("frobnicate").returncode == 2
    assert kdcore_cli("list", "lossez").returncode == 2
    bad = tmp_path / "broken.toml"
    bad.write_text("[run\n")
    out = kdcore_cli("train", str(bad))
    assert out.returncode == 2 and "invalid TOML" in out.stderr
    out = kdcore_cli("train", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and "config file not found" in out.stderr
    out = kdcore_cli("train", str(tmp_path / "missing.toml"), "--set", "nonsense")
    assert out.returncode == 2


def test_failure_while_running_exits_1(tmp_path):
    conf = runs.teacher_config(epochs=1)
    conf["run"]["device"] = "cuda"
    out = kdcore_cli("train", str(write(tmp_path / "c.toml", conf)))
    if out.returncode == 0:
        pytest.skip("a CUDA device is present")
    assert out.returncode == 2 and "run.device" in out.stderr


def test_list_and_plugins_json():
    out = kdcore_cli("list", "loss")
    assert out.returncode == 0 and {"ce", "kd", "rkd"} <= set(out.stdout.split())
    data = json.loads(kdcore_cli("list", "--json").stdout)
    assert {"loss", "divergence", "transform", "scheduler", "backbone", "dataset", "batch_policy"} == set(data)
    plugins = json.loads(kdcore_cli("plugins", "--json").stdout)
    builtin = next(p for p in plugins["plugins"] if p["name"] == "builtin")
    assert builtin["distribution"] == "kdcore" and "mlp" in builtin["registered"]["backbone"]


def test_only_builtin_with_empty_allow_list():
    out = kdcore_cli("list", "loss", env={"KDCORE_PLUGINS": ""})
    assert out.stdout.split() == ["ce", "kd", "rkd"]


def test_demo_runs_offline(tmp_path):
    out = kdcore_cli("demo", "--out", str(tmp_path / "demo"), "--quiet", env={"KDCORE_PLUGINS": ""})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[2].startswith("bayes posterior") and lines[3].startswith("teacher")
    assert lines[4] == "soft labels on the 300 labelled samples:"
    assert lines[8] == "soft labels also on 2700 unlabelled samples (transfer set):"
    rows = {line.split("  ")[0].strip(): line for line in lines[2:11] if not line.endswith(":")}
    assert set(rows) == {"bayes posterior", "teacher", "ce", "ce + kd", "ce + rkd",
                         "ce + kd (transfer)", "ce + rkd (transfer)"}
    for line in rows.values():
        acc = float(line.split()[-6])
        assert 0.5 < acc <= 1.0  # 3 balanced classes: chance is 1/3
    # the table's numbers are the runs' summaries: mean test TV over the seeds of ce + kd, in both groups
    for run, row in (("student-kd", "ce + kd"), ("transfer-kd", "ce + kd (transfer)")):
        tvs = [json.loads((tmp_path / "demo" / f"{run}-s{s}" / "summary.json").read_text())["test_tv"]
               for s in (1, 2, 3)]
        assert f"{sum(tvs) / 3:8.4f}" in rows[row]
    # the teacher row is the teacher the students learnt from (best.pt), as their runs evaluated it
    teacher_tv = json.loads((tmp_path / "demo" / "student-kd-s1" / "summary.json").read_text())["teacher_test_tv"]
    assert f"{teacher_tv:8.4f}" in rows["teacher"]
    assert "by more than the seeds' spread" in out.stdout
    assert "with the transfer set, closer than on the labelled samples alone" in out.stdout
    assert list((tmp_path / "demo" / "student-kd-s1" / "tb").glob("events.*"))


def test_plugin_demo_that_is_not_installed_is_a_one_line_error(tmp_path):
    out = kdcore_cli("demo", "lm", "--out", str(tmp_path / "d"), env={"KDCORE_PLUGINS": ""})
    assert out.returncode == 2 and "kdcore-lm" in out.stderr and "pip install" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = kdcore_cli("demo", "nosuch", "--out", str(tmp_path / "d"), env={"KDCORE_PLUGINS": ""})
    assert out.returncode == 2 and "demo 'nosuch'" in out.stderr and not (tmp_path / "d").exists()


def test_rerun_into_a_finished_run_needs_overwrite(tmp_path):
    conf = write(tmp_path / "t.toml", runs.teacher_config(epochs=1))
    assert kdcore_cli("train", str(conf), "--out", str(tmp_path / "t"), "--quiet").returncode == 0
    best = (tmp_path / "t" / "checkpoints" / "best.pt").read_bytes()
    out = kdcore_cli("train", str(conf), "--out", str(tmp_path / "t"), "--quiet")
    assert out.returncode == 2 and "--resume" in out.stderr and "--overwrite" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert (tmp_path / "t" / "checkpoints" / "best.pt").read_bytes() == best
    assert "--overwrite" in kdcore_cli("train", "--help").stdout


def test_the_console_script_exits_with_mains_code_and_spares_the_teardown_its_collections(monkeypatch):
    import gc

    import kdcore.cli.commands

    frozen = []
    monkeypatch.setattr(kdcore.cli.commands, "main", lambda: 3)
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    with pytest.raises(SystemExit) as exc:
        kdcore.cli.commands.run()
    assert exc.value.code == 3 and frozen == [True]


# -- a plugin's loss that misbehaves ------------------------------------------------------------
MISBEHAVING = textwrap.dedent('''
    import torch

    import kdcore
    from kdcore.common.errors import RunFailure


    class Mine:
        """A supervised loss that misbehaves from its ``at``-th call on, as ``how`` says."""

        uses_teacher = False

        def __init__(self, *, how: str = "raise", at: int = 1):
            self.how, self.at, self.calls = how, at, 0

        def __call__(self, student, teacher, target):
            self.calls += 1
            rows = torch.nn.functional.cross_entropy(student, target, reduction="none")
            if self.calls < self.at:
                return rows.mean()
            if self.how == "raise":
                raise ValueError("no good\\nthe second line of the message")
            if self.how == "config":
                raise kdcore.ConfigError("loss[1].how: the loss's own message")
            if self.how == "failure":
                raise RunFailure("the loss's own failure")
            return {"vector": rows[:4], "float": 0.5, "none": None}[self.how]


    @kdcore.hookimpl
    def register_losses(register):
        register("mine", Mine)
''')


def _misbehaving_registry():
    """The built-in plugin and a plugin registering the loss ``mine``."""
    from kdcore.plugins import load_registry

    plugin = types.ModuleType("misbehaving_loss")
    exec(MISBEHAVING, plugin.__dict__)
    return load_registry(env={}, entry_points=[], extra_plugins=[("misbehaving_loss", plugin)])


def _with_mine(**params) -> dict:
    conf = runs.teacher_config(epochs=1)
    conf["loss"].append({"name": "mine", **params})
    return conf


@pytest.mark.parametrize("params, message", [
    ({"how": "raise", "at": 3}, "step 3: loss term 'mine' (loss[1]) raised ValueError: no good"),
    ({"how": "vector"}, "step 1: loss term 'mine' (loss[1]) returned a tensor of shape [4], not a scalar"),
    ({"how": "float", "at": 2}, "step 2: loss term 'mine' (loss[1]) returned a float, not a scalar tensor"),
    ({"how": "none"}, "step 1: loss term 'mine' (loss[1]) returned None, not a scalar tensor"),
])
def test_a_loss_that_raises_or_returns_no_scalar_names_the_term_and_the_step(tmp_path, params, message):
    from kdcore.common.errors import LossTermFailure

    with pytest.raises(LossTermFailure) as exc:
        kdcore.train(_with_mine(**params), tmp_path, quiet=True, registry=_misbehaving_registry())
    assert str(exc.value) == message


@pytest.mark.parametrize("how, kind, message", [
    ("config", kdcore.ConfigError, "loss[1].how: the loss's own message"),
    ("failure", RunFailure, "the loss's own failure"),
])
def test_kdcores_own_exceptions_from_a_loss_pass_unchanged(tmp_path, how, kind, message):
    with pytest.raises(kind) as exc:
        kdcore.train(_with_mine(how=how), tmp_path, quiet=True, registry=_misbehaving_registry())
    assert type(exc.value) is kind and str(exc.value) == message


def test_a_loss_that_raises_exits_1_with_one_line(tmp_path):
    (tmp_path / "mine_loss.py").write_text(MISBEHAVING)  # a python: component beside the config
    conf = runs.teacher_config(epochs=1)
    conf["loss"].append({"name": "python:mine_loss:Mine", "id": "mine", "at": 2})
    out = kdcore_cli("train", str(write(tmp_path / "c.toml", conf)), "--out", str(tmp_path / "o"))
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "kdcore: failed: step 2: loss term 'mine' (loss[1]) raised ValueError: no good"]
