"""KDTrainer with a batch policy (``batch_policy={"name": "on_policy", ...}``): the same draws,
generated sequences, per-step losses and final weights as ``kdcore train`` on the same seeds
and batches; resuming from a Trainer checkpoint continues the same draws; lmbda = 0 is an
ordinary run; micro-batches of different widths make one step batch; one-line config errors."""

from __future__ import annotations

import importlib.util
import json
import runpy
from pathlib import Path

import pytest
import torch

import kdcore
from kdcore.engine import build_trainer
from kdcore_lm import KDTrainer
from kdcore_lm.on_policy import OnPolicy
from kdcore_lm.trainer import StepBatch, join_micro_batches

spec = importlib.util.spec_from_file_location("helpers_lm", Path(__file__).with_name("helpers_lm.py"))
H = importlib.util.module_from_spec(spec)
spec.loader.exec_module(H)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
V, T = 48, 12
DATA = {"name": "synthetic_lm", "n": 48, "length": T, "vocab_size": V, "states": 6}
TEACHER = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2}
STUDENT = {**TEACHER, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
LOSSES = [{"name": "ce", "weight": 0.5}, {"name": "kd", "temperature": 1.0, "weight": 0.5}]
#: synthetic_lm has no EOS: token 20 ends rows early, so micro-batches keep unequal token counts
POLICY = {"name": "on_policy", "lmbda": 0.5, "prompt_length": 4, "max_new_tokens": 8, "temperature": 1.0,
          "top_p": 0.9, "eos_token_id": 20}
SEED, STEPS, BATCH, ACCUMULATE = 2, 4, 8, 2  # seed 2: steps 0, 1 train on the data, 2, 3 generate


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A teacher with random weights, saved as a kdcore checkpoint."""
    return H.random_teacher(tmp_path_factory.mktemp("kdt_teacher"), V, T, TEACHER)


def _conf(ckpt, policy, data=None):
    return {"run": {"seed": SEED, "epochs": 1, "batch_size": BATCH, "accumulate": ACCUMULATE, "progress": "off",
                    "max_steps": STEPS, "log_every": 1},
            "data": dict(data or DATA),
            "teacher": {"backbone": "hf", "config": dict(TEACHER), "checkpoint": ckpt},
            "student": {"backbone": "hf", "config": dict(STUDENT)},
            "optim": {"name": "adamw", "lr": 5e-3, "weight_decay": 0.0}, "loss": LOSSES,
            "batch_policy": dict(policy)}


@pytest.fixture
def recorded(monkeypatch):
    """Every call of the on_policy batch policy: its step, the batch it got, what it made."""
    calls = []
    original = OnPolicy.__call__

    def record(self, batch, context):
        made = original(self, batch, context)
        calls.append({"step": context.progress.step, "kept": made is batch,
                      "in": ({k: v.clone() for k, v in batch.inputs.items()}, batch.target.clone()),
                      "out": (made.inputs["input_ids"].clone(), made.target.clone())})
        return made

    monkeypatch.setattr(OnPolicy, "__call__", record)
    return calls


Rows = H.TrainerRows


def _args(out, **kw):
    """Trainer arguments of the kdcore run: AdamW at a constant rate, no clipping, the same seed."""
    return H.trainer_args(out, batch=BATCH, accumulate=ACCUMULATE, steps=STEPS, seed=SEED,
                          **{"max_grad_norm": 0.0, **kw})


def _models(ckpt, policy, data=None):
    """The student (as the run builds it, before training) and the teacher, as transformers models."""
    fresh = build_trainer(_conf(ckpt, policy, data), None, quiet=True)
    return fresh.student.model, fresh.teacher.model


def _engine_run(ckpt, policy, out, recorded, data=None):
    """``kdcore train``'s run: its policy calls, per-step losses and final student weights."""
    kdcore.train(_conf(ckpt, policy, data), out, quiet=True)
    calls = list(recorded)
    recorded.clear()
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    weights = {k.removeprefix("model."): v for k, v in last["model"].items()}
    return calls, steps, weights


def _data_of(calls):
    """The engine's batches (before the policy) as one row dataset, in step order (rows of a
    step share its width; steps may differ)."""
    rows = [(c["in"][0], c["in"][1]) for c in calls]
    return Rows({k: [r for inputs, _ in rows for r in inputs[k]] for k in rows[0][0]},
                [r for _, target in rows for r in target])


def _same_calls(a, b):
    assert [c["step"] for c in a] == [c["step"] for c in b] == list(range(len(a)))
    assert [c["kept"] for c in a] == [c["kept"] for c in b]
    for x, y in zip(a, b):
        assert torch.equal(x["out"][0], y["out"][0]) and torch.equal(x["out"][1], y["out"][1])


@pytest.fixture(scope="module")
def text_data(tmp_path_factory, tokenizer_dir, tokenizer):
    """prompt/completion records of the in-process tokenizer, and on_policy settings for them
    (prompts from the targets, the tokenizer's EOS and padding)."""
    words = ["cat", "dog", "day", "night", "park", "answer", "mat", "red"]
    records = [{"prompt": f"tell me about the {w}" + " please" * (i % 3),
                "completion": f"the {w} sat on the mat" + " yes" * (i % 4)}
               for i, w in enumerate(words * 4)]
    path = H.write_jsonl(tmp_path_factory.mktemp("kdt_text") / "train.jsonl", records)
    data = {"name": "text", "path": str(path), "val_path": str(path), "tokenizer": str(tokenizer_dir),
            "max_length": 24}
    policy = {"name": "on_policy", "lmbda": 0.5, "max_new_tokens": 6, "temperature": 1.0,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return data, policy


def _text_teacher(data, tmp_path):
    """A teacher with random weights over the tokenizer's vocabulary, saved as a kdcore checkpoint."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(data["tokenizer"], local_files_only=True))
    teacher = kdcore.create("backbone", "hf", num_classes=vocab, in_features=data["max_length"],
                            config=dict(TEACHER))
    torch.save({"model": teacher.state_dict()}, tmp_path / "text_teacher.pt")
    return str(tmp_path / "text_teacher.pt")


CASES = {"student_or_data": (None, POLICY),
         "student_or_teacher": (None, {**POLICY, "seq_kd": True, "temperature": 0.7})}


@pytest.mark.parametrize("case", [*CASES, "prompt_completion_text"])
def test_on_policy_run_equals_kdcore_train(teacher_ckpt, tmp_path, recorded, case, request):
    data, policy = request.getfixturevalue("text_data") if case not in CASES else CASES[case]
    ckpt = teacher_ckpt if data is None else _text_teacher(data, tmp_path)
    engine_calls, engine_steps, engine_weights = _engine_run(ckpt, policy, tmp_path / "engine", recorded, data)
    assert len(engine_calls) == STEPS
    kept = [c["kept"] for c in engine_calls]
    assert not all(kept)  # some steps generate
    assert any(kept) == (not policy.get("seq_kd", False))  # the others train on the data, or the teacher's tokens
    half = BATCH // ACCUMULATE
    assert any(int((c["out"][1][:half] != -100).sum()) != int((c["out"][1][half:] != -100).sum())
               for c in engine_calls)  # the logged step values weigh micro-batches by their kept tokens
    student, teacher = _models(ckpt, policy, data)
    trainer = KDTrainer(model=student, teacher=teacher, losses=LOSSES, batch_policy=policy,
                        train_dataset=_data_of(engine_calls), args=_args(tmp_path / "hf"))
    trainer.train()
    _same_calls(engine_calls, recorded)
    logged = {h["step"]: h for h in trainer.state.log_history if "loss/kd" in h}
    assert sorted(logged) == [r["step"] for r in engine_steps] == list(range(1, STEPS + 1))
    for r in engine_steps:
        for term in ("loss/ce", "loss/kd"):
            assert logged[r["step"]][term] == pytest.approx(r[term], rel=1e-5), (r["step"], term)
    got = student.state_dict()
    assert got.keys() == engine_weights.keys()
    for k, v in got.items():
        torch.testing.assert_close(v, engine_weights[k], rtol=1e-5, atol=1e-6)  # bitwise on one CPU here


def test_resume_from_a_trainer_checkpoint_continues_the_same_draws(teacher_ckpt, tmp_path, recorded):
    engine_calls, _, _ = _engine_run(teacher_ckpt, POLICY, tmp_path / "engine", recorded)
    data = _data_of(engine_calls)
    student, teacher = _models(teacher_ckpt, POLICY)
    full = KDTrainer(model=student, teacher=teacher, losses=LOSSES, batch_policy=POLICY, train_dataset=data,
                     args=_args(tmp_path / "full", save_strategy="steps", save_steps=2))
    full.train()
    whole = list(recorded)
    recorded.clear()
    again, teacher = _models(teacher_ckpt, POLICY)
    resumed = KDTrainer(model=again, teacher=teacher, losses=LOSSES, batch_policy=POLICY, train_dataset=data,
                        args=_args(tmp_path / "resumed"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert [c["step"] for c in recorded] == [2, 3]
    _same_calls(whole, whole[:2] + recorded)
    _same_calls(engine_calls, whole)
    a, b = student.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lambda_0_is_an_ordinary_run_bitwise(teacher_ckpt, tmp_path, recorded):
    engine_calls, _, _ = _engine_run(teacher_ckpt, POLICY, tmp_path / "engine", recorded)
    data = _data_of(engine_calls)
    states = []
    for policy in (None, {**POLICY, "lmbda": 0.0}):
        student, teacher = _models(teacher_ckpt, POLICY)
        KDTrainer(model=student, teacher=teacher, losses=LOSSES, batch_policy=policy, train_dataset=data,
                  args=_args(tmp_path / "hf")).train()
        states.append(student.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert len(recorded) == STEPS and all(c["kept"] for c in recorded)


def test_micro_batches_of_different_widths_make_one_step_batch(teacher_ckpt, tmp_path):
    """A collator that pads each micro-batch to its own longest row: the policy sees one batch,
    right-padded (mask 0, target -100), and the step trains on its micro-batches' row counts."""
    seen = []

    def policy(batch, context):
        seen.append((batch, context))
        return batch.replace(target=batch.target.clone())  # a new batch: split back into micro-batches

    short = {"input_ids": torch.tensor([[5, 6, 7]] * 2), "attention_mask": torch.tensor([[1, 1, 0]] * 2),
             "labels": torch.tensor([[5, 6, -100]] * 2)}
    wide = {"input_ids": torch.tensor([[8, 9, 10, 11]] * 3), "labels": torch.tensor([[8, 9, 10, 11]] * 3)}
    student, teacher = _models(teacher_ckpt, POLICY)
    trainer = KDTrainer(model=student, teacher=teacher, losses=LOSSES, batch_policy=policy,
                        args=_args(tmp_path / "hf"))
    made = trainer.apply_batch_policy([short, wide])
    (batch, context), = seen
    assert batch.inputs["input_ids"].tolist() == [[5, 6, 7, 0]] * 2 + [[8, 9, 10, 11]] * 3
    assert batch.inputs["attention_mask"].tolist() == [[1, 1, 0, 0]] * 2 + [[1, 1, 1, 1]] * 3
    assert batch.target.tolist() == [[6, -100, -100, -100]] * 2 + [[9, 10, 11, -100]] * 3
    assert (context.seed, context.progress.step, context.world) == (SEED, 0, 1)
    assert not context.teacher.training  # the teacher generates in eval mode and stays there
    assert [len(m["target"]) for m in made] == [2, 3] and set(made[0]) == {"input_ids", "attention_mask", "target"}
    assert torch.equal(made[1]["input_ids"], batch.inputs["input_ids"][2:])
    one = join_micro_batches([{"input_ids": wide["input_ids"]}], [wide["labels"]])
    assert isinstance(one, StepBatch) and set(one.inputs) == {"input_ids"} and len(one) == 3


@pytest.mark.parametrize("policy, teacher, message", [
    ({**POLICY, "lmbda": 1.5}, True, "batch_policy.lmbda: must be a number in [0, 1], got 1.5"),
    ({**POLICY, "top_p": 0.0}, True, "batch_policy.top_p: must be a number in (0, 1], got 0.0"),
    ({"name": "on_policy", "lambda": 0.5}, True,
     "batch_policy.lambda: unknown parameter of batch_policy 'on_policy'"),
    ({"lmbda": 0.5}, True, "batch_policy.name: a batch_policy table needs a 'name'"),
    ({"name": "on_polcy"}, True, "batch_policy.name: unknown batch_policy 'on_polcy'; did you mean 'on_policy'?"),
    (3, True, "batch_policy: expected a batch_policy name, a table with 'name', or a batch_policy object, got 3"),
    ({**POLICY, "seq_kd": True}, False, "teacher: required by batch_policy.seq_kd = true (the teacher generates "
                                        "the completions of the steps the student does not)"),
])
def test_wrong_settings_are_one_line_config_errors(teacher_ckpt, tmp_path, policy, teacher, message):
    student, teacher_model = _models(teacher_ckpt, POLICY)
    with pytest.raises(kdcore.ConfigError) as info:
        KDTrainer(model=student, teacher=teacher_model if teacher else None,
                  losses=LOSSES if teacher else ["ce"], batch_policy=policy, args=_args(tmp_path))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_packed_rows_are_refused_at_the_first_generating_step(teacher_ckpt, tmp_path):
    class Packed(Rows):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "position_ids": torch.arange(T)}

    student, teacher = _models(teacher_ckpt, POLICY)
    data = Packed({"input_ids": torch.randint(0, V, (8, T))}, torch.randint(0, V, (8, T)))
    trainer = KDTrainer(model=student, teacher=teacher, losses=LOSSES, batch_policy={**POLICY, "lmbda": 1.0},
                        train_dataset=data, args=_args(tmp_path, max_steps=1))
    with pytest.raises(kdcore.ConfigError) as info:
        trainer.train()
    assert str(info.value) == ("batch_policy: on_policy needs batches of input_ids and attention_mask (one document "
                               "per row, no packing), got ['input_ids', 'position_ids']")


def test_example_script_runs_shortened(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = runpy.run_path(str(EXAMPLES / "lm_kdtrainer_on_policy.py"))
    result = script["main"](["--steps", "2", "--n", "96", "--out", str(tmp_path / "runs")])
    assert set(result) == {"teacher_test_nll", "student_test_nll", "true_nll"}
    assert all(0.0 < v < 10.0 for v in result.values())  # finite NLLs over 256 tokens (log 256 = 5.5)
