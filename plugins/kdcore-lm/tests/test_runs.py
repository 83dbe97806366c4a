"""End to end through kdcore.train: a teacher on synthetic_lm, students with ce + kd (dense
and, where kdcore has the fused projection, fused), an exact --resume, a text run with
packing and accumulation, and the tiny example configs (shortened)."""

from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path

import pytest
import torch

import kdcore
from kdcore.engine.trainer import Trainer
from kdcore_lm.hf import core_fuses
from kdcore_lm.metrics import evaluate_lm

spec = importlib.util.spec_from_file_location("helpers_lm", Path(__file__).with_name("helpers_lm.py"))
H = importlib.util.module_from_spec(spec)
spec.loader.exec_module(H)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
DATA = {"name": "synthetic_lm", "n": 320, "length": 12, "vocab_size": 48, "states": 6}
TEACHER = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2}
STUDENT = {**TEACHER, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}


def teacher_config(epochs=3):
    return {"run": {"seed": 0, "epochs": epochs, "batch_size": 32, "progress": "off"}, "data": dict(DATA),
            "student": {"backbone": "hf", "config": dict(TEACHER)},
            "optim": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0}, "loss": [{"name": "ce"}]}


def student_config(checkpoint, epochs=2, fused="auto", chunk_size=0, **run):
    kd = {"name": "kd", "temperature": 2.0, "schedule": {"name": "linear", "start": 0.5, "end": 1.0}}
    if chunk_size:
        kd["chunk_size"] = chunk_size
    return {"run": {"seed": 3, "epochs": epochs, "batch_size": 32, "progress": "off", **run}, "data": dict(DATA),
            "teacher": {"backbone": "hf", "config": dict(TEACHER), "checkpoint": checkpoint, "fused": fused},
            "student": {"backbone": "hf", "config": dict(STUDENT), "fused": fused},
            "optim": {"name": "adamw", "lr": 5e-3, "weight_decay": 0.0}, "loss": [{"name": "ce"}, kd]}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_teacher")
    summary = kdcore.train(teacher_config(), out, quiet=True)
    return out / "checkpoints" / "best.pt", summary


def rebuild(conf_section, checkpoint):
    data = kdcore.create("dataset", DATA["name"], **{k: v for k, v in DATA.items() if k != "name"})
    torch.manual_seed(0)
    model = kdcore.create("backbone", "hf", num_classes=data.num_classes, in_features=DATA["length"],
                          config=dict(conf_section))
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    return model, data


def test_teacher_learns_the_language(teacher):
    ckpt, summary = teacher
    assert summary["test_tv"] < 0.6 and math.isfinite(summary["test_acc"])
    trained, data = rebuild(TEACHER, ckpt)
    torch.manual_seed(0)
    fresh = kdcore.create("backbone", "hf", num_classes=48, in_features=12, config=dict(TEACHER))
    kl_trained = evaluate_lm(trained, data.test)["kl_to_truth"]
    assert kl_trained < 0.5 * evaluate_lm(fresh, data.test)["kl_to_truth"]


@pytest.mark.parametrize("mode", ["dense", "fused"])
def test_student_distils_with_ce_and_kd(teacher, tmp_path, mode):
    if mode == "fused" and not core_fuses():
        pytest.skip("kdcore's logit losses do not take Outputs(hidden, head) yet (the fused projection)")
    conf = student_config(str(teacher[0]), fused=(mode == "fused"), chunk_size=64 if mode == "fused" else 0)
    summary = kdcore.train(conf, tmp_path / mode, quiet=True)
    assert math.isfinite(summary["test_tv"]) and summary["test_tv"] < 0.9
    final = summary["final"]
    assert math.isfinite(final["loss/kd"]) and final["weight/kd"] > 0.5


def test_dense_and_fused_student_losses_agree(teacher):
    if not core_fuses():
        pytest.skip("kdcore's logit losses do not take Outputs(hidden, head) yet (the fused projection)")
    from kdcore.engine import build_trainer

    values = []
    for fused, chunk in ((False, 0), (True, 16)):
        trainer = build_trainer(student_config(str(teacher[0]), fused=fused, chunk_size=chunk), None, quiet=True)
        batch = next(iter(trainer.batches.epoch(torch.Generator().manual_seed(0))))
        values.append({k: float(v) for k, v in trainer.train_step(batch).items()})
    assert values[0] == pytest.approx(values[1], rel=1e-4)


def test_resume_is_exact(teacher, tmp_path, monkeypatch):
    conf = student_config(str(teacher[0]), epochs=2, checkpoint_every=3)  # 9 steps per epoch
    kdcore.train(conf, tmp_path / "full", quiet=True)
    original = Trainer.train_step

    def stop_at_step_12(self, *args, **kwargs):
        if self.step == 11:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", stop_at_step_12)
    with pytest.raises(KeyboardInterrupt):
        kdcore.train(conf, tmp_path / "cut", quiet=True)
    monkeypatch.setattr(Trainer, "train_step", original)
    cut = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert (cut["step"], cut["epoch"], cut["batch_in_epoch"]) == (9, 1, 0)
    kdcore.train(conf, tmp_path / "cut", resume=True, quiet=True)
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("full", "cut"))
    assert a["step"] == b["step"] == 18
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_text_run_with_packing_and_accumulation(tmp_path, tokenizer_dir):
    sentences = ["the cat sat on the mat", "a dog ran in the park", "the big red dog is good",
                 "one two three four five", "what is the answer", "the small blue cat ran"]
    records = [{"prompt": f"tell me {s.split()[1]}", "completion": s} for s in sentences] * 4
    train = H.write_jsonl(tmp_path / "train.jsonl", records)
    val = H.write_jsonl(tmp_path / "val.jsonl", records[:6])
    conf = {"run": {"seed": 0, "epochs": 2, "batch_size": 4, "accumulate": 2, "progress": "off"},
            "data": {"name": "text", "path": str(train), "val_path": str(val), "tokenizer": str(tokenizer_dir),
                     "max_length": 32, "packing": True},
            "student": {"backbone": "hf", "config": dict(STUDENT)},
            "optim": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0}, "loss": [{"name": "ce"}]}
    summary = kdcore.train(conf, tmp_path / "run", quiet=True)
    assert summary["best_val_acc"] > 0.2


def test_example_configs_run_shortened(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = ["data.n=160", "data.length=12", "run.epochs=1"]
    kdcore.train(EXAMPLES / "lm_synthetic_teacher.toml", tmp_path / "runs" / "lm_teacher", small, quiet=True)
    summary = kdcore.train(EXAMPLES / "lm_synthetic_kd.toml", tmp_path / "runs" / "lm_kd", small, quiet=True)
    assert math.isfinite(summary["test_tv"])
    shutil.rmtree(tmp_path / "runs")


def test_teacher_from_a_local_directory(teacher, tmp_path, capsys):
    from kdcore_lm.export import main as export_main

    trained, _ = rebuild(TEACHER, teacher[0])
    trained.model.save_pretrained(tmp_path / "teacher_dir")
    assert export_main([str(tmp_path / "teacher_dir"), str(tmp_path / "teacher.pt")]) == 0
    assert export_main([str(tmp_path / "nowhere"), str(tmp_path / "x.pt")]) == 2
    written = (tmp_path / "teacher.pt").read_bytes()
    capsys.readouterr()
    assert export_main([str(tmp_path / "teacher_dir"), str(tmp_path / "teacher.pt")]) == 2  # never replaced silently
    assert capsys.readouterr().err == (f"error: out: {tmp_path / 'teacher.pt'} exists; choose another file, or pass "
                                       "--overwrite to replace it\n")
    assert (tmp_path / "teacher.pt").read_bytes() == written
    assert export_main([str(tmp_path / "teacher_dir"), str(tmp_path / "teacher.pt"), "--overwrite"]) == 0
    assert export_main([str(tmp_path / "teacher_dir"), str(tmp_path / "no" / "t.pt")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left
    conf = student_config(str(tmp_path / "teacher.pt"), epochs=1)
    conf["teacher"] = {"backbone": "hf", "path": str(tmp_path / "teacher_dir"), "checkpoint": str(tmp_path / "teacher.pt")}
    summary = kdcore.train(conf, tmp_path / "run", quiet=True)
    assert math.isfinite(summary["final"]["loss/kd"])


@pytest.mark.parametrize("name", ["lm_abkd_dolly.toml", "lm_gkd_jsd.toml", "lm_synthetic_teacher.toml",
                                  "lm_synthetic_kd.toml"])
def test_example_configs_are_valid(name):
    from kdcore import config as cfg
    from kdcore.engine.objective import Objective
    from kdcore.plugins import default_registry

    conf = cfg.load(EXAMPLES / name)
    cfg.check_components(conf, default_registry())
    Objective.from_config(conf, default_registry())
    assert conf.student.backbone == "hf"
