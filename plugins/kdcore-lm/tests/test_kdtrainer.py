"""KDTrainer: a transformers.Trainer distilling with kdcore loss terms; the same loss as the
kdcore engine on the same batch; normalised by the tokens of the whole accumulated step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import kdcore
from kdcore.engine import build_trainer
from kdcore_lm import KDTrainer

spec = importlib.util.spec_from_file_location("helpers_lm", Path(__file__).with_name("helpers_lm.py"))
H = importlib.util.module_from_spec(spec)
spec.loader.exec_module(H)

V, T = 40, 10
TEACHER = H.TINY["llama"]
STUDENT = {**TEACHER, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
LOSSES = [{"name": "ce", "weight": 0.5},
          {"name": "kd", "temperature": 2.0, "schedule": {"name": "linear", "start": 0.5, "end": 1.0}}]


def tiny(conf, seed):
    torch.manual_seed(seed)
    return kdcore.create("backbone", "hf", num_classes=V, in_features=T, config=dict(conf), fused=False)


class Rows(torch.utils.data.Dataset):
    """Hugging Face style samples: input_ids, attention_mask, labels (unshifted, -100 on a prompt)."""

    def __init__(self, n=24, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, V, (n, T), generator=g)
        self.labels = self.ids.clone()
        prompt = torch.randint(1, T - 2, (n,), generator=g)
        self.labels[torch.arange(T).unsqueeze(0) < prompt.unsqueeze(1)] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(T, dtype=torch.long),
                "labels": self.labels[i]}


def args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, use_cpu=True, report_to="none",
                save_strategy="no", logging_steps=1, learning_rate=1e-2, disable_tqdm=True, seed=0)
    return TrainingArguments(**{**base, **kw})


def test_trains_a_few_steps_with_accumulation(tmp_path):
    student, teacher = tiny(STUDENT, 1).model, tiny(TEACHER, 0).model
    before = [p.detach().clone() for p in student.parameters()]
    trainer = KDTrainer(model=student, teacher=teacher, losses=LOSSES, train_dataset=Rows(),
                        args=args(tmp_path, max_steps=3, gradient_accumulation_steps=2))
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert all(not p.requires_grad for p in teacher.parameters())
    logged = [h for h in trainer.state.log_history if "loss/kd" in h]
    assert len(logged) == 3 and all(h["weight/kd"] >= 0.5 for h in logged)
    assert logged[0]["weight/kd"] < logged[-1]["weight/kd"]  # the time schedule follows the steps


def test_same_loss_as_the_kdcore_engine_on_the_same_batch(tmp_path):
    teacher_model = tiny(TEACHER, 0)
    ckpt = tmp_path / "teacher.pt"
    torch.save({"model": teacher_model.state_dict()}, ckpt)
    conf = {"run": {"seed": 0, "epochs": 1, "batch_size": 8, "progress": "off"},
            "data": {"name": "synthetic_lm", "n": 64, "length": T, "vocab_size": V, "states": 4},
            "teacher": {"backbone": "hf", "config": dict(TEACHER), "checkpoint": str(ckpt), "fused": False},
            "student": {"backbone": "hf", "config": dict(STUDENT), "fused": False},
            "optim": {"name": "adamw", "lr": 1e-3}, "loss": LOSSES}
    engine = build_trainer(conf, None, quiet=True)
    batch = next(iter(engine.batches.epoch(torch.Generator().manual_seed(0))))
    batch.target[:, :3] = -100  # a prompt
    batch.target[:, -1] = -100  # the last position (labels cannot say what follows it)
    batch.target[5, :6] = -100  # unequal kept tokens per row
    with torch.no_grad():
        weights = engine.objective.weights(engine.progress())
        s, t = engine.forward(batch, engine.objective.active(weights), engine.student)
        want = float(engine.objective.total(engine.objective.losses(s, t, batch.target, weights), weights))
    kd = KDTrainer(model=engine.student.model, teacher=engine.teacher.model, losses=LOSSES, args=args(tmp_path))
    inputs = {**batch.inputs, "target": batch.target}
    with torch.no_grad():
        got = float(kd.compute_loss(engine.student.model, inputs))
        # labels (unshifted, Hugging Face's convention) give the same targets
        labels = torch.cat([torch.full((8, 1), -100), batch.target[:, :-1]], 1)
        via_labels = float(kd.compute_loss(engine.student.model, {**batch.inputs, "labels": labels}))
        # two micro-batches normalised by the whole step's kept tokens sum to the whole batch's mean
        kept = (batch.target != -100).sum()
        engine.student.model.train()
        halves = sum(float(kd.compute_loss(engine.student.model,
                                           {"input_ids": batch.inputs["input_ids"][sl], "target": batch.target[sl]},
                                           num_items_in_batch=kept))
                     for sl in (slice(0, 3), slice(3, 8)))
    assert got == pytest.approx(want, rel=1e-6)
    assert via_labels == pytest.approx(want, rel=1e-6)
    assert halves == pytest.approx(want, rel=1e-5)
    assert int(kd._get_num_items_in_batch([{"target": batch.target[:3]}, {"labels": labels[3:]}], "cpu")) == kept


def test_errors(tmp_path):
    student = tiny(STUDENT, 1).model
    with pytest.raises(kdcore.ConfigError, match="teacher: required by loss term"):
        KDTrainer(model=student, losses=["ce", "kd"], args=args(tmp_path))
    with pytest.raises(kdcore.ConfigError, match="temprature"):
        KDTrainer(model=student, teacher=student, losses=[{"name": "kd", "temprature": 2.0}], args=args(tmp_path))
    big = kdcore.create("backbone", "hf", num_classes=5000, config=dict(TEACHER)).model
    with pytest.raises(kdcore.ConfigError, match=r"5000 vocabulary rows.*40 tokens"):
        KDTrainer(model=student, teacher=big, losses=["kd"], args=args(tmp_path))


def test_fused_equals_dense(tmp_path):
    from kdcore_lm.hf import core_fuses

    if not core_fuses():
        pytest.skip("kdcore's logit losses do not take Outputs(hidden, head) yet (the fused projection)")
    student, teacher = tiny(STUDENT, 1).model.eval(), tiny(TEACHER, 0).model
    rows = Rows(8)
    inputs = {"input_ids": rows.ids, "labels": rows.labels}
    fused = [{**t, "chunk_size": 16} for t in LOSSES]
    values = []
    for flag, losses in ((False, LOSSES), (True, fused)):
        kd = KDTrainer(model=student, teacher=teacher, losses=losses, fused=flag, args=args(tmp_path))
        with torch.no_grad():
            values.append(float(kd.compute_loss(student, inputs)))
    assert values[0] == pytest.approx(values[1], rel=1e-5)
