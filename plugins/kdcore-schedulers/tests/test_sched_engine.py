"""The schedulers inside kdcore.train on a small gaussian_mixture: logged weights,
and an interrupted crossbatch run (every=3, distill_decay time schedules) that
resumes to the same weights (the cached coefficients are checkpointed)."""

import json

import pytest
import torch

import kdcore
from kdcore.engine.trainer import Trainer

DATA = {"name": "gaussian_mixture", "n": 600}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("sched_teacher")
    kdcore.train({"run": {"seed": 0, "epochs": 1, "batch_size": 32, "progress": "off"}, "data": dict(DATA),
                  "student": {"backbone": "mlp", "hidden": [32]},
                  "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0}, "loss": [{"name": "ce"}]},
                 out, quiet=True)
    return str(out / "checkpoints" / "best.pt")


def student(ckpt, weighting=None, epochs=1, losses=None):
    conf = {"run": {"seed": 3, "epochs": epochs, "batch_size": 50, "progress": "off"}, "data": dict(DATA),
            "teacher": {"backbone": "mlp", "hidden": [32], "checkpoint": ckpt},
            "student": {"backbone": "mlp", "hidden": [8]},
            "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
            "loss": losses or [{"name": "ce"}, {"name": "kd", "temperature": 2.0}]}
    if weighting:
        conf["weighting"] = weighting
    return conf


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_crossbatch_logs_its_weights(tmp_path, teacher):
    summary = kdcore.train(student(teacher, {"name": "crossbatch", "mode": "align", "every": 2}), tmp_path,
                           quiet=True)
    rec = records(tmp_path)[-1]
    for k in ["w_ce", "w_kd", "lam", "cos_ce_ref", "cos_kd_ref", "norm_ce", "coef/ce", "coef/kd"]:
        assert f"weighting/{k}" in rec, k
    assert 0.0 <= summary["test_acc"] <= 1.0


def test_crossbatch_every_k_with_distill_decay_resumes_exactly(tmp_path, teacher, monkeypatch):
    losses = [{"name": "ce", "schedule": {"name": "distill_decay", "role": "ce"}},
              {"name": "kd", "schedule": {"name": "distill_decay", "role": "kd"}},
              {"name": "kd", "id": "reg", "schedule": {"name": "distill_decay", "role": "reg", "beta": 0.2}}]
    # 11 steps per epoch: the first step of epoch 2 reuses coefficients cached in epoch 1
    conf = student(teacher, {"name": "crossbatch", "every": 3}, epochs=2, losses=losses)
    kdcore.train(conf, tmp_path / "full", quiet=True)
    original = Trainer.train_step

    def interrupt_in_epoch_2(self, *args, **kwargs):
        if self.epoch == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        kdcore.train(conf, tmp_path / "cut", quiet=True)
    monkeypatch.setattr(Trainer, "train_step", original)
    kdcore.train(conf, tmp_path / "cut", resume=True, quiet=True)
    full, cut = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("full", "cut"))
    assert full["weighting"] == cut["weighting"] and full["weighting"]["coefficients"] is not None
    assert all(torch.equal(full["model"][k], v) for k, v in cut["model"].items())
    last = records(tmp_path / "full")[-1]
    assert (last["weight/ce"], last["weight/kd"], last["weight/reg"]) == (1.0, 0.0, 0.2)
