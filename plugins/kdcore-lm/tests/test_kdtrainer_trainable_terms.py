"""KDTrainer with loss terms that own trainable parameters (``kd`` with the ``ctkd`` transform,
CTKD's learnable temperature): the same per-step losses, student weights and temperature as
``kdcore train`` on the same batches and seed; the terms' state in every checkpoint and in
``save_model``, and a resumed run ends where the uninterrupted one does; 2 gloo processes
(torchrun) end with the temperature of 1 process on the same global batch; one-line errors.

Run as a script under torchrun (``main``), it is the 2-process side of the DDP test.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdcore
from kdcore.common.errors import DamagedCheckpoint, RunFailure
from kdcore.engine import build_trainer
from kdcore.engine.step import Step
from kdcore_lm import KDTrainer
from kdcore_lm.term_state import TERMS_FILE

_spec = importlib.util.spec_from_file_location("helpers_lm", Path(__file__).with_name("helpers_lm.py"))
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

TORCHRUN = Path(sys.executable).parent / "torchrun"
V, T = 48, 12
STEPS, BATCH, ACCUMULATE, SEED = 4, 8, 2, 2
#: n = STEPS * BATCH: one epoch of STEPS steps, so that both trainers' Progress (and ctkd's curriculum) agree
DATA = {"name": "synthetic_lm", "n": STEPS * BATCH, "length": T, "vocab_size": V, "states": 6}
TEACHER = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2}
STUDENT = {**TEACHER, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
CTKD = {"name": "ctkd", "init": 4.0, "epochs": 1, "lambda_min": 0.5}
INSTANCE = {**CTKD, "mode": "instance", "hidden": 8}


def losses(ctkd=CTKD):
    return [{"name": "ce", "weight": 0.5}, {"name": "kd", "temperature": 1.0, "transforms": [dict(ctkd)]}]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A teacher with random weights, saved as a kdcore checkpoint."""
    return H.random_teacher(tmp_path_factory.mktemp("kdt_terms_teacher"), V, T, TEACHER)


def _conf(ckpt, ctkd=CTKD):
    return {"run": {"seed": SEED, "epochs": 1, "batch_size": BATCH, "accumulate": ACCUMULATE, "progress": "off",
                    "max_steps": STEPS, "log_every": 1},
            "data": dict(DATA),
            "teacher": {"backbone": "hf", "config": dict(TEACHER), "checkpoint": ckpt},
            "student": {"backbone": "hf", "config": dict(STUDENT)},
            "optim": {"name": "adamw", "lr": 5e-3, "weight_decay": 0.0, "clip_grad_norm": 0.5},
            "loss": losses(ctkd)}


def _args(out, **kw):
    """Trainer arguments of the kdcore run: AdamW at a constant rate, the global norm clipped
    at 0.5, one epoch of STEPS steps, the same seed, the batches in order."""
    return H.trainer_args(out, batch=BATCH, accumulate=ACCUMULATE, steps=STEPS, seed=SEED,
                          **{"max_grad_norm": 0.5, "num_train_epochs": 1, **kw})


def _models(ckpt, ctkd=CTKD):
    """The student (as the kdcore run builds it, before training) and the teacher, as transformers models."""
    fresh = build_trainer(_conf(ckpt, ctkd), None, quiet=True)
    return fresh.student.model, fresh.teacher.model


@pytest.fixture(scope="module")
def engine_run(teacher_ckpt, tmp_path_factory):
    """``kdcore train``'s run: its step batches in order, per-step losses, final last.pt."""
    out = tmp_path_factory.mktemp("kdt_terms_engine")
    seen = []
    original = Step.__call__

    def record(self, batch, *args, **kwargs):
        seen.append((batch.inputs["input_ids"].clone(), batch.target.clone()))
        return original(self, batch, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Step, "__call__", record)
        kdcore.train(_conf(teacher_ckpt), out, quiet=True)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    data = H.TrainerRows({"input_ids": torch.cat([ids for ids, _ in seen])}, torch.cat([t for _, t in seen]))
    return data, steps, last


def _tau(state):
    """ctkd's global temperature from the terms' state dict."""
    return 1.0 + 20.0 * torch.sigmoid(state["kd.transform_modules.0.raw"])


def test_ctkd_trains_as_under_kdcore_train(teacher_ckpt, engine_run, tmp_path):
    data, engine_steps, last = engine_run
    student, teacher = _models(teacher_ckpt)
    trainer = KDTrainer(model=student, teacher=teacher, losses=losses(), train_dataset=data,
                        args=_args(tmp_path / "hf", weight_decay=0.0))
    before = {k: v.clone() for k, v in trainer.objective.modules.state_dict().items()}
    trainer.train()
    group = trainer.optimizer.param_groups[-1]
    assert [id(p) for p in group["params"]] == [id(trainer.objective.modules["kd"].transform_modules["0"].raw)]
    assert (group["lr"], group["weight_decay"]) == (5e-3, 0.0)
    logged = {h["step"]: h for h in trainer.state.log_history if "loss/kd" in h}
    assert sorted(logged) == [r["step"] for r in engine_steps] == list(range(1, STEPS + 1))
    assert all(h["grad_norm"] > 0.5 for h in logged.values())  # every step clips
    for r in engine_steps:
        for term in ("loss/ce", "loss/kd"):
            assert logged[r["step"]][term] == pytest.approx(r[term], rel=1e-5), (r["step"], term)
    weights = {k.removeprefix("model."): v for k, v in last["model"].items()}
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=1e-5, atol=1e-6)
    terms = trainer.objective.modules.state_dict()
    assert terms.keys() == last["losses"].keys() == {"kd.transform_modules.0.raw"}
    torch.testing.assert_close(terms["kd.transform_modules.0.raw"], last["losses"]["kd.transform_modules.0.raw"],
                               rtol=1e-5, atol=1e-6)
    assert abs(float(_tau(terms) - _tau(before))) > 1e-3  # the temperature trained
    assert trainer.objective.modules["kd"].transform_modules["0"].raw.grad is None  # cleared after each step


@pytest.mark.parametrize("epochs_arg", [1, 3])
def test_progress_counts_the_loaders_steps_per_epoch_under_max_steps(teacher_ckpt, engine_run, tmp_path,
                                                                      epochs_arg):
    """Under ``max_steps`` the terms' Progress (ctkd's curriculum counts epochs in it) has the
    training loader's steps per epoch and the epochs the steps make, whatever
    ``num_train_epochs`` says: 3 copies of the data make an epoch longer than STEPS steps,
    so STEPS steps are one epoch."""
    data, _, _ = engine_run
    tripled = H.TrainerRows({"input_ids": data.inputs["input_ids"].repeat(3, 1)}, data.target.repeat(3, 1))
    student, teacher = _models(teacher_ckpt)
    trainer = KDTrainer(model=student, teacher=teacher, losses=losses(), train_dataset=tripled,
                        args=_args(tmp_path / "hf", num_train_epochs=epochs_arg))
    seen = []
    original = trainer.objective.weights
    trainer.objective.weights = lambda progress: (seen.append(progress), original(progress))[1]
    trainer.train()
    per_epoch = math.ceil(math.ceil(len(tripled) / (BATCH // ACCUMULATE)) / ACCUMULATE)  # the Trainer's count
    assert per_epoch > STEPS
    assert {(p.epochs, p.steps_per_epoch, p.total_steps) for p in seen} == {(1, per_epoch, STEPS)}
    assert trainer.state.log_history[0]["epoch"] == pytest.approx(1 / per_epoch)  # the Trainer's own count
    assert sorted({p.step for p in seen}) == list(range(STEPS))


def test_fused_trains_the_terms_as_the_dense_path(teacher_ckpt, engine_run, tmp_path):
    """``fused=True`` (the terms take their own gradients chunk by chunk) ends 2 steps where
    the dense logits do, the temperature included."""
    from kdcore_lm.hf import core_fuses

    if not core_fuses():
        pytest.skip("kdcore's logit losses do not take Outputs(hidden, head) yet (the fused projection)")
    data, _, _ = engine_run
    states = []
    for fused in (False, True):
        student, teacher = _models(teacher_ckpt)
        terms = [{**t, "chunk_size": 16} if fused else t for t in losses()]
        trainer = KDTrainer(model=student, teacher=teacher, losses=terms, fused=fused, train_dataset=data,
                            args=_args(tmp_path / "hf", max_steps=2))
        trainer.train()
        states.append({**student.state_dict(), **trainer.objective.modules.state_dict()})
    dense, fused = states
    key = "kd.transform_modules.0.raw"
    assert dense.keys() == fused.keys() and key in dense
    for k, v in dense.items():
        if k != key:
            torch.testing.assert_close(fused[k], v, rtol=1e-5, atol=1e-6)
    # the temperature's gradient is about 1e-5: AdamW's division by its running scale turns the
    # chunked sum's float differences (1e-4 relative) into 2e-5 relative in the trained value
    torch.testing.assert_close(fused[key], dense[key], rtol=1e-4, atol=0.0)
    assert abs(float(_tau(fused)) - CTKD["init"]) > 1e-3  # it trained


def test_the_terms_group_takes_the_trainers_rate_decay_and_schedule(teacher_ckpt, engine_run, tmp_path):
    data, _, _ = engine_run
    student, teacher = _models(teacher_ckpt)
    trainer = KDTrainer(model=student, teacher=teacher, losses=losses(), train_dataset=data,
                        args=_args(tmp_path / "hf", weight_decay=0.1, lr_scheduler_type="linear", max_steps=2))
    trainer.train()
    *student_groups, terms = trainer.optimizer.param_groups
    assert terms["weight_decay"] == 0.1 and terms["initial_lr"] == 5e-3
    assert terms["lr"] == student_groups[0]["lr"] == 0.0  # linear to 0 after max_steps, as the student's


def test_resume_from_a_checkpoint_ends_where_the_uninterrupted_run_does(teacher_ckpt, engine_run, tmp_path):
    """Instance mode (an MLP created from the vocabulary's width): a run resumed from
    ``checkpoint-2`` ends bitwise where the uninterrupted run does, the MLP included."""
    data, _, _ = engine_run
    student, teacher = _models(teacher_ckpt, INSTANCE)
    full = KDTrainer(model=student, teacher=teacher, losses=losses(INSTANCE), train_dataset=data,
                     args=_args(tmp_path / "full", save_strategy="steps", save_steps=2))
    initial = {k: v.clone() for k, v in full.objective.modules.state_dict().items()}
    assert initial["kd.transform_modules.0.mlp.0.weight"].shape == (8, 2 * V)
    full.train()
    saved = torch.load(tmp_path / "full" / "checkpoint-2" / TERMS_FILE, weights_only=True)["losses"]
    assert saved.keys() == initial.keys()
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)  # trained for 2 steps
    again, teacher = _models(teacher_ckpt, INSTANCE)
    resumed = KDTrainer(model=again, teacher=teacher, losses=losses(INSTANCE), train_dataset=data,
                        args=_args(tmp_path / "resumed"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    a, b = student.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = full.objective.modules.state_dict(), resumed.objective.modules.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], saved[k]) for k in a)  # steps 3-4 trained the MLP
    full.save_model(str(tmp_path / "final"))
    final = torch.load(tmp_path / "final" / TERMS_FILE, weights_only=True)["losses"]
    assert all(torch.equal(final[k], a[k]) for k in a)


def test_load_best_model_at_end_loads_the_best_checkpoints_terms(teacher_ckpt, engine_run, tmp_path):
    data, _, _ = engine_run
    student, teacher = _models(teacher_ckpt)
    trainer = KDTrainer(model=student, teacher=teacher, losses=losses(), train_dataset=data, eval_dataset=data,
                        args=_args(tmp_path / "best", save_strategy="steps", save_steps=2, eval_strategy="steps",
                                   eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
                                   greater_is_better=True))  # the higher loss: checkpoint-2, not the last
    trainer.train()
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    best = torch.load(tmp_path / "best" / "checkpoint-2" / TERMS_FILE, weights_only=True)["losses"]
    last = torch.load(tmp_path / "best" / "checkpoint-4" / TERMS_FILE, weights_only=True)["losses"]
    key = "kd.transform_modules.0.raw"
    assert not torch.equal(best[key], last[key])
    assert torch.equal(trainer.objective.modules.state_dict()[key], best[key])


@pytest.fixture(scope="module")
def checkpoint(teacher_ckpt, engine_run, tmp_path_factory):
    """A 2-step KDTrainer run with ctkd (global) that saved checkpoint-2."""
    out = tmp_path_factory.mktemp("kdt_terms_ckpt")
    student, teacher = _models(teacher_ckpt)
    KDTrainer(model=student, teacher=teacher, losses=losses(), train_dataset=engine_run[0],
              args=_args(out, max_steps=2, save_strategy="steps", save_steps=2)).train()
    return out / "checkpoint-2"


def _resume_from(directory, teacher_ckpt, engine_run, tmp_path, ctkd=CTKD):
    student, teacher = _models(teacher_ckpt, ctkd)
    trainer = KDTrainer(model=student, teacher=teacher, losses=losses(ctkd), train_dataset=engine_run[0],
                        args=_args(tmp_path / "again"))
    trainer.train(resume_from_checkpoint=str(directory))


def _copy(checkpoint, tmp_path):
    target = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, target)
    return target


def test_a_checkpoint_without_the_terms_file_is_one_line(checkpoint, teacher_ckpt, engine_run, tmp_path):
    damaged = _copy(checkpoint, tmp_path)
    (damaged / TERMS_FILE).unlink()
    with pytest.raises(kdcore.ConfigError) as info:
        _resume_from(damaged, teacher_ckpt, engine_run, tmp_path)
    assert str(info.value) == (
        f"resume_from_checkpoint: {damaged / TERMS_FILE} is missing; it holds the state of the loss terms "
        "(kd.transform_modules.0.raw), which KDTrainer writes into every checkpoint; resume from a checkpoint "
        "that KDTrainer saved with these losses")


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_a_mapping"])
def test_a_damaged_terms_file_is_one_line(checkpoint, teacher_ckpt, engine_run, tmp_path, damage):
    damaged = _copy(checkpoint, tmp_path)
    path = damaged / TERMS_FILE
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"model": {}}, path)
    with pytest.raises(DamagedCheckpoint) as info:
        _resume_from(damaged, teacher_ckpt, engine_run, tmp_path)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, RunFailure)  # exit 1 under the CLI
    if damage == "not_a_mapping":
        assert message == (f"{path}: not a KDTrainer loss-terms file (no 'losses' mapping); resume from an "
                           "earlier checkpoint")
    else:
        assert message.startswith(f"{path}: cannot be read (") and message.endswith(
            "); resume from an earlier checkpoint")


def test_a_checkpoint_of_other_terms_is_one_line(checkpoint, teacher_ckpt, engine_run, tmp_path):
    with pytest.raises(kdcore.ConfigError) as info:
        _resume_from(checkpoint, teacher_ckpt, engine_run, tmp_path, ctkd=INSTANCE)
    assert str(info.value) == (
        f"resume_from_checkpoint: {checkpoint / TERMS_FILE} holds the state of other loss terms (missing: "
        "kd.transform_modules.0.mlp.0.bias, kd.transform_modules.0.mlp.0.weight, kd.transform_modules.0.mlp.2.bias, "
        "...; unexpected: kd.transform_modules.0.raw); resume with the losses it was saved with")


def test_a_given_optimizer_without_the_terms_is_refused(teacher_ckpt, tmp_path):
    student, teacher = _models(teacher_ckpt)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    with pytest.raises(kdcore.ConfigError) as info:
        KDTrainer(model=student, teacher=teacher, losses=losses(), args=_args(tmp_path),
                  optimizers=(optimizer, None))
    assert str(info.value) == (
        "optimizers: the given optimizer does not hold the loss terms' trainable parameters "
        "(kd.transform_modules.0.raw); leave optimizers out (or pass optimizer_cls_and_kwargs) so that KDTrainer "
        "adds them as a param group")
    # optimizer_cls_and_kwargs goes through create_optimizer: the terms get their group
    made = KDTrainer(model=student, teacher=teacher, losses=losses(), args=_args(tmp_path),
                     optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 1e-3})).create_optimizer()
    assert isinstance(made, torch.optim.SGD) and made.param_groups[-1]["params"][0].shape == ()
    # without trainable terms a given optimizer is the user's business, as before
    KDTrainer(model=student, teacher=teacher, losses=["ce", "kd"], args=_args(tmp_path), optimizers=(optimizer, None))


@pytest.mark.parametrize("kind", ["DEEPSPEED", "FSDP"])
def test_sharded_distributions_are_refused(teacher_ckpt, tmp_path, monkeypatch, kind):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    student, teacher = _models(teacher_ckpt)
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType[kind]))
    with pytest.raises(kdcore.ConfigError) as info:
        KDTrainer(model=student, teacher=teacher, losses=losses(), args=_args(tmp_path))
    assert str(info.value) == (
        "losses: terms with trainable parameters (kd.transform_modules.0.raw) are trained by KDTrainer in one "
        f"process or under DDP (torchrun) only, not under {kind}; use DDP or kdcore train")
    KDTrainer(model=student, teacher=teacher, losses=["ce", "kd"], args=_args(tmp_path))  # nothing to train: as before


# -- two processes -------------------------------------------------------------------------------
DDP_STEPS = 3


def _ddp_trainer(out, world: int) -> KDTrainer:
    """A KDTrainer with ctkd on tiny llamas and a global batch of 8 rows per step, split over
    ``world`` processes (each its share, 2 micro-batches)."""
    torch.manual_seed(0)
    teacher = kdcore.create("backbone", "hf", num_classes=V, config=dict(TEACHER), fused=False).model
    torch.manual_seed(1)
    student = kdcore.create("backbone", "hf", num_classes=V, config=dict(STUDENT), fused=False).model
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (DDP_STEPS * 8, T), generator=g)
    target = torch.cat([ids[:, 1:], torch.full((len(ids), 1), -100)], 1)
    target[torch.arange(len(ids)) % 3 == 0, :5] = -100  # unequal kept tokens per row and per process
    return KDTrainer(model=student, teacher=teacher, losses=losses({**CTKD, "epochs": 3}),
                     train_dataset=H.TrainerRows({"input_ids": ids}, target),
                     args=_args(out, per_device_train_batch_size=8 // world // 2, gradient_accumulation_steps=2,
                                max_steps=DDP_STEPS, ddp_backend="gloo" if world > 1 else None))


def main(argv: list[str]) -> None:
    """The 2-process side: train, then save the model, the terms and the log into ``argv[0]``."""
    trainer = _ddp_trainer(argv[0], int(os.environ["WORLD_SIZE"]))
    trainer.train()
    trainer.save_model(argv[0])
    if trainer.args.process_index == 0:
        (Path(argv[0]) / "log_history.json").write_text(json.dumps(trainer.state.log_history))


@pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_gloo_processes_end_with_the_terms_of_one(tmp_path):
    one = _ddp_trainer(tmp_path / "one", 1)
    before = float(_tau(one.objective.modules.state_dict()))
    one.train()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", __file__, str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    two = torch.load(tmp_path / "two" / TERMS_FILE, weights_only=True)["losses"]
    mine = one.objective.modules.state_dict()
    torch.testing.assert_close(two["kd.transform_modules.0.raw"], mine["kd.transform_modules.0.raw"],
                               rtol=1e-5, atol=1e-6)
    assert abs(float(_tau(mine)) - before) > 1e-3  # the temperature trained
    # the logged term values are the global step's, not process 0's (which keeps other token counts)
    logged = [{k: h[k] for k in ("step", "loss/ce", "loss/kd", "weight/kd")} for h in one.state.log_history
              if "loss/kd" in h]
    logged_two = [h for h in json.loads((tmp_path / "two" / "log_history.json").read_text()) if "loss/kd" in h]
    assert [h["step"] for h in logged] == [h["step"] for h in logged_two] == list(range(1, DDP_STEPS + 1))
    for a, b in zip(logged, logged_two):
        for k in ("loss/ce", "loss/kd", "weight/kd"):
            assert b[k] == pytest.approx(a[k], rel=1e-4), (a["step"], k)  # as the weights (float drift)
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "two" / "model.safetensors")
    assert weights.keys() == one.model.state_dict().keys()
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    main(sys.argv[1:])
