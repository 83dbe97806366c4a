"""``fused = "auto"`` under FSDP: the ``hf`` student computes its logits inside forward
by itself (the engine asks it through ``prefer_logits()`` before sharding it), so a
config that trains in one process trains on 2 gloo ranks with ``run.strategy =
"fsdp"`` unchanged, exactly as with ``fused = false``; an explicit ``fused = true``
stays a one-line config error on every rank."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch

import kdcore

TORCHRUN = Path(sys.executable).parent / "torchrun"
_spec = importlib.util.spec_from_file_location("helpers_lm", Path(__file__).with_name("helpers_lm.py"))
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

DATA = {"name": "synthetic_lm", "n": 64, "length": 8, "vocab_size": 32, "states": 4}
MODEL = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1}
REFUSED = ("kdcore: error: student: under run.strategy = 'fsdp' the student must return its logits, not hidden "
           "states and a head to project later (the head would run outside FSDP's gradient reduction); for the "
           "hf backbone set student.fused = false or \"auto\"")

needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None,
                                    reason="torchrun not installed")


def _conf(teacher: str, fused) -> dict:
    """2 FSDP steps of a tiny llama student with chunked (fusable) ce and kd terms."""
    return {"run": {"seed": 3, "epochs": 1, "max_steps": 2, "batch_size": 16, "progress": "off",
                    "device": "cpu", "strategy": "fsdp"},
            "data": dict(DATA),
            "teacher": {"backbone": "hf", "config": dict(MODEL), "checkpoint": teacher},
            "student": {"backbone": "hf", "config": dict(MODEL), "fused": fused},
            "optim": {"name": "adamw", "lr": 5e-3, "weight_decay": 0.0},
            "loss": [{"name": "ce", "chunk_size": 32}, {"name": "kd", "temperature": 2.0, "chunk_size": 32}]}


def _torchrun(conf: dict, tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(conf))
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "kdcore", "train", str(path),
                           "--out", str(tmp_path / name), "--quiet"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return H.train_teacher(tmp_path_factory.mktemp("hf_teacher"), DATA, MODEL)


def _model(fused) -> torch.nn.Module:
    return kdcore.create("backbone", "hf", num_classes=DATA["vocab_size"], in_features=DATA["length"],
                         config=dict(MODEL), fused=fused)


def test_prefer_logits_turns_auto_to_logits_and_keeps_an_explicit_choice():
    ids = torch.zeros(1, 4, dtype=torch.long)
    auto = _model("auto")
    assert not auto(ids).has_logits  # kdcore's losses fuse: no logits by default
    auto.prefer_logits()
    out = auto(ids)
    assert auto.fused is False and out.has_logits and out.projectable
    explicit = _model(True)
    explicit.prefer_logits()
    assert explicit.fused is True and not explicit(ids).has_logits


@needs_torchrun
def test_fsdp_two_ranks_train_with_fused_auto_as_with_fused_false(tmp_path, teacher):
    auto = _torchrun(_conf(teacher, "auto"), tmp_path, "auto")
    assert auto.returncode == 0, auto.stderr[-3000:]
    false = _torchrun(_conf(teacher, False), tmp_path, "false")
    assert false.returncode == 0, false.stderr[-3000:]
    a = torch.load(tmp_path / "auto" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "false" / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 2
    torch.manual_seed(3)  # the student's initial weights, as run.seed = 3 builds them
    init = _model(False).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in a["model"].items()), "the student did not train"
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k


@needs_torchrun
def test_fsdp_refuses_an_explicit_fused_true_in_one_line(tmp_path, teacher):
    refused = _torchrun(_conf(teacher, True), tmp_path, "true")
    lines = [line for line in refused.stderr.splitlines() if line.startswith("kdcore: error:")]
    assert refused.returncode != 0 and lines == [REFUSED, REFUSED], refused.stderr[-3000:]
    assert "exitcode  : 2 " in refused.stderr  # torchrun's summary of the failed ranks
