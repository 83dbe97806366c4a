"""Model outputs, feature taps and trainable loss terms (contract: "Model outputs,
feature taps and trainable loss terms"), through a third-party plugin installed
with an entry point and written only against the public API."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch
from torch import nn

import kdcore
from kdcore.engine import build_trainer
from kdcore.engine.taps import Tapping
from kdcore.engine.trainer import Trainer


def _load(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runs = _load("helpers_runs")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, registry):
    out = tmp_path_factory.mktemp("teacher")
    kdcore.train(runs.teacher_config(epochs=1), out, quiet=True, registry=registry)
    return str(out / "checkpoints" / "best.pt")


def hint_config(teacher, **run):
    conf = runs.student_config(teacher, **run)
    conf["student"]["dropout"] = 0.0
    conf["loss"].append({"name": "hint", "weight": 0.5})
    return conf


# -- Outputs --------------------------------------------------------------------------------------
def test_logits_are_computed_from_the_head_once():
    calls = []
    lin = nn.Linear(4, 3)

    def head(h):
        calls.append(1)
        return lin(h)

    out = kdcore.Outputs(hidden=torch.randn(2, 5, 4), head=head)
    assert out.projectable and not out.has_logits
    first = out.logits
    assert out.logits is first and len(calls) == 1 and first.shape == (2, 5, 3)
    assert kdcore.Outputs.of(first).logits is first
    with pytest.raises(ValueError, match="logits, or both hidden and head"):
        kdcore.Outputs(hidden=torch.randn(2, 4))
    with pytest.raises(TypeError, match="logits tensor or kdcore.Outputs"):
        kdcore.Outputs.of((first,))


# -- taps -----------------------------------------------------------------------------------------
def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def _check_tapping(model, x, paths):
    hooks = _hook_count(model)
    expected = {}
    handles = [dict(model.named_modules())[p].register_forward_hook(
        lambda m, a, o, p=p: expected.__setitem__(p, o)) for p in paths]
    with torch.no_grad():
        plain = model(x)
    for h in handles:
        h.remove()
    with torch.no_grad(), Tapping(model, paths) as features:
        tapped = model(x)
    assert torch.equal(plain, tapped)  # taps do not change the model's output
    assert sorted(features) == sorted(paths)
    for p in paths:
        assert torch.equal(features[p], expected[p])
    assert _hook_count(model) == hooks  # the taps' hooks are removed after the pass


def test_taps_on_an_mlp():
    model = kdcore.create("backbone", "mlp", num_classes=3, in_features=30, hidden=[16, 8]).eval()
    _check_tapping(model, torch.randn(4, 30), ["net.2", "net.4"])


@pytest.mark.parametrize("name,paths", [("resnet8x4", ["stages.0", "stages.2", "stem"]),
                                        ("tv.resnet18", ["net.layer1", "net.layer4.1.conv2"])])
def test_taps_on_zoo_and_torchvision_models(name, paths):
    if name not in kdcore.available("backbone"):
        pytest.skip(f"{name} needs kdcore-vision")
    model = kdcore.create("backbone", name, num_classes=10).eval()
    _check_tapping(model, torch.randn(2, 3, 32, 32), paths)


def test_unknown_tap_path_names_the_term_and_close_matches(teacher, registry):
    conf = hint_config(teacher)
    conf["loss"][2]["student_layers"] = "net.9"
    with pytest.raises(kdcore.ConfigError, match=r"loss\[2\]: student tap 'net.9' is not a module of the "
                                                 r"student \(close matches: .*net\.1"):
        build_trainer(conf, None, quiet=True, registry=registry)
    conf["loss"][2]["student_layers"], conf["loss"][2]["teacher_layers"] = "net.2", "nett.2"
    with pytest.raises(kdcore.ConfigError, match=r"loss\[2\]: teacher tap 'nett.2'"):
        build_trainer(conf, None, quiet=True, registry=registry)


def test_teacher_features_carry_no_gradient_and_only_named_modules_are_hooked(teacher, registry):
    trainer = build_trainer(hint_config(teacher), None, quiet=True, registry=registry)
    batch = next(iter(trainer.batches.epoch(torch.Generator().manual_seed(0))))
    s, t = trainer.forward(batch, trainer.objective.terms, trainer.model)
    assert list(s.features) == ["net.2"] and list(t.features) == ["net.2"]
    assert s.features["net.2"].requires_grad and not t.features["net.2"].requires_grad
    assert torch.equal(s.index, batch.index) and t.index is batch.index
    plain, _ = trainer.forward(batch, trainer.objective.terms[:1], trainer.model)  # ce only: no taps
    assert plain.features == {}
    trainer.train_step(batch)
    hint = trainer.objective.modules["hint"]
    assert hint.connector.weight.grad is not None
    assert all(p.grad is None for p in trainer.teacher.parameters())


# -- trainable loss terms -------------------------------------------------------------------------
def test_connector_trains_with_the_student_in_its_own_group(teacher, registry):
    trainer = build_trainer(hint_config(teacher), None, quiet=True, registry=registry)
    hint = trainer.objective.modules["hint"]
    assert trainer.term_parameter_count == 8 * 32 + 32
    assert [len(g["params"]) for g in trainer.optimizer.param_groups] == [4, 2]
    before = hint.connector.weight.detach().clone()
    for batch in list(trainer.batches.epoch(torch.Generator().manual_seed(0)))[:3]:
        trainer.train_step(batch)
    assert not torch.equal(before, hint.connector.weight) and float(hint.visits.sum()) == 3 * 32


def test_hint_run_checkpoints_and_resumes_bitwise_mid_epoch(tmp_path, teacher, registry, monkeypatch, capsys):
    conf = hint_config(teacher, epochs=3, checkpoint_every=5)  # 17 steps per epoch
    full = kdcore.train(conf, tmp_path / "full", registry=registry)
    assert "loss terms add 288 trainable parameters" in capsys.readouterr().err
    assert full["loss_term_parameters"] == 288
    original = Trainer.train_step

    def stop_at_step_24(self, *args, **kwargs):
        if self.step == 23:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", stop_at_step_24)
    with pytest.raises(KeyboardInterrupt):
        kdcore.train(conf, tmp_path / "cut", quiet=True, registry=registry)
    monkeypatch.setattr(Trainer, "train_step", original)
    cut_state = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert (cut_state["step"], cut_state["epoch"], cut_state["batch_in_epoch"]) == (20, 1, 3)
    kdcore.train(conf, tmp_path / "cut", resume=True, quiet=True, registry=registry)
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("full", "cut"))
    assert a["step"] == b["step"] == 51
    for part in ("model", "losses"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert torch.equal(b["losses"]["hint.visits"], torch.full((600,), 3.0, dtype=torch.float64).index_fill(
        0, torch.arange(540, 600), 0.0))  # every training sample seen once per epoch
    records = [[{k: v for k, v in json.loads(line).items() if k != "epoch_time_s"}
                for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("full", "cut")]
    assert records[0] == records[1]  # the interrupted epoch's means include the steps before the cut


def test_cli_finds_the_plugin_and_reports_a_bad_tap_in_one_line(tmp_path, site, teacher):
    conf = hint_config(teacher, epochs=1)
    conf["loss"][2]["teacher_layers"] = "net.7"
    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps(conf))
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("KDCORE_PLUGINS", None)
    out = subprocess.run([sys.executable, "-m", "kdcore", "train", str(path), "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and "Warning" not in ln]
    assert len(lines) == 1 and "loss[2]: teacher tap 'net.7'" in lines[0] and "Traceback" not in out.stderr


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun not installed")
def test_ddp_keeps_connectors_and_banks_in_step_and_batch_level_terms_see_the_local_batch(tmp_path, site, teacher):
    conf = hint_config(teacher, epochs=1, device="cpu")
    conf["loss"].append({"name": "rows_seen"})
    path = tmp_path / "s.toml"
    path.write_text(tomli_w.dumps(conf))
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    env.pop("KDCORE_PLUGINS", None)
    for world, out in ((1, "one"), (2, "two")):
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={world}",
               "-m", "kdcore", "train", str(path), "--out", str(tmp_path / out), "--quiet"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("one", "two"))
    for k in ("hint.connector.weight", "hint.connector.bias"):
        torch.testing.assert_close(two["losses"][k], one["losses"][k], rtol=1e-4, atol=1e-5)
    assert torch.equal(two["losses"]["hint.visits"], one["losses"]["hint.visits"])  # updates of both ranks
    assert int(one["losses"]["rows_seen.rows"]) == 32 and int(two["losses"]["rows_seen.rows"]) == 16


FEATURES_ONLY = '''
import kdcore
from torch import nn


class FeaturesOnly(nn.Module):
    """A backbone whose forward returns features and no logits."""

    def __init__(self, num_classes, in_features=30):
        super().__init__()
        self.body = nn.Linear(in_features, 8)

    def forward(self, x):
        return kdcore.Outputs(features={"body": self.body(x)})
'''


def test_outputs_without_logits_are_a_one_line_config_error(tmp_path, capsys):
    """docs/outputs.md: logits (or hidden and head) are required; features alone are refused
    where the model returns them, one line and exit 2 from ``kdcore train``."""
    expected = ("kdcore.Outputs: a model's outputs need logits, or both hidden and head to compute them "
                "(got features): the engine evaluates every model by its logits; return the logits with "
                "the features, Outputs(logits, features=...)")
    with pytest.raises(kdcore.ConfigError) as info:
        kdcore.Outputs(features={"body": torch.zeros(2, 8)})
    assert str(info.value) == expected
    (tmp_path / "features_only.py").write_text(FEATURES_ONLY)
    conf = runs.teacher_config(epochs=1)
    conf["student"] = {"backbone": "python:features_only:FeaturesOnly"}
    code, err = runs.cli(capsys, "train", str(runs.write(tmp_path / "run.toml", conf)), "--out", str(tmp_path / "o"))
    assert (code, runs.one_line(err)) == (2, f"kdcore: error: {expected}")
