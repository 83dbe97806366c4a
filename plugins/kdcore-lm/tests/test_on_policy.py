"""On-policy and sequence-level distillation (batch policy ``on_policy``): prompts, sampling,
generation, the masks of the generated batch, and runs through the kdcore engine
(lambda = 0 is an ordinary run, lambda = 1 trains on the generated tokens only,
determinism, exact resume, lambda on a schedule, seq_kd, config errors)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kdcore
from kdcore.engine import build_trainer
from kdcore.engine.trainer import Trainer
from kdcore.losses.policy import SAMPLE, StepContext
from kdcore.losses.schedule import Progress
from kdcore_lm.generation import completion_batch, generate, prompt_lengths
from kdcore_lm.on_policy import OnPolicy
from kdcore_lm.sampling import nucleus_probs, sample_next

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
DATA = {"name": "synthetic_lm", "n": 96, "length": 12, "vocab_size": 48, "states": 6}
TEACHER = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2}
STUDENT = {**TEACHER, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
POLICY = {"name": "on_policy", "prompt_length": 4, "max_new_tokens": 8, "eos_token_id": 7}


# -- the generated batch's masks ------------------------------------------------------------------
def test_masks_prompt_and_everything_after_the_first_eos():
    EOS, PAD = 3, 0
    prompts = torch.tensor([[5, 6, 7], [8, 9, 0]])
    lengths = torch.tensor([3, 2])
    generated = torch.tensor([[10, EOS, 11, EOS], [13, 14, 15, EOS]])  # row 0 stops at its 2nd token
    inputs, target = completion_batch(prompts, lengths, generated, eos_token_id=EOS, pad_token_id=PAD)
    X = -100
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 10, EOS, PAD], [8, 9, 13, 14, 15, EOS]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    # target[t] = token t+1 where that token was generated (the EOS kept), else -100
    assert target.tolist() == [[X, X, 10, EOS, X, X], [X, 13, 14, 15, EOS, X]]
    inputs, target = completion_batch(prompts, lengths, generated, eos_token_id=None, pad_token_id=PAD)
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 10, EOS, 11, EOS], [8, 9, 13, 14, 15, EOS, PAD]]
    assert target.tolist() == [[X, X, 10, EOS, 11, EOS, X], [X, 13, 14, 15, EOS, X, X]]


def test_prompts_from_targets_with_left_or_right_padding():
    X = -100
    # row: prompt 11 12 13, completion 21 22 (targets shifted: kept from the last prompt token on)
    right = {"input_ids": torch.tensor([[11, 12, 13, 21, 22, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0]])}
    right_t = torch.tensor([[X, X, 21, 22, X, X, X]])
    left = {"input_ids": torch.tensor([[0, 0, 11, 12, 13, 21, 22]]),
            "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1, 1]])}
    left_t = torch.tensor([[X, X, X, X, 21, 22, X]])
    for inputs, target in ((right, right_t), (left, left_t)):
        tokens, lengths = prompt_lengths(inputs, target)
        assert lengths.tolist() == [3] and tokens[0, :3].tolist() == [11, 12, 13]
        tokens, lengths = prompt_lengths(inputs, target, prompt_length=2)
        assert lengths.tolist() == [2] and tokens[0, :2].tolist() == [11, 12]
    no_target = torch.full_like(right_t, X)
    assert prompt_lengths(right, no_target)[1].tolist() == [5]  # all prompt
    plain = {"input_ids": torch.tensor([[1, 2, 3, 4]])}  # synthetic_lm: no mask, every target kept
    assert prompt_lengths(plain, torch.tensor([[2, 3, 4, 5]]))[1].tolist() == [1]
    assert prompt_lengths(plain, torch.tensor([[2, 3, 4, 5]]), prompt_length=9)[1].tolist() == [4]


# -- sampling against a plain float64 reference -------------------------------------------------------
def _reference_law(logits, temperature, top_p):
    p = torch.softmax(logits.double() / temperature, -1)
    out = torch.zeros_like(p)
    for i in range(p.shape[0]):
        order = sorted(range(p.shape[1]), key=lambda j: (-float(p[i, j]), j))
        mass = 0.0
        for j in order:
            if mass >= top_p:
                break
            out[i, j] = p[i, j]
            mass += float(p[i, j])
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (1.5, 0.5), (1.0, 0.05)])
def test_top_p_and_temperature_match_a_plain_reference(temperature, top_p):
    logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, 4:] = float("-inf")  # padding columns are never drawn
    want = _reference_law(logits, temperature, top_p)
    got = nucleus_probs(logits, temperature, top_p)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    tokens = sample_next(logits, torch.Generator().manual_seed(5), temperature=temperature, top_p=top_p)
    u = torch.rand(6, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cdf = torch.cumsum(want, -1)
    expected = [int((cdf[i] <= u[i]).sum()) for i in range(6)]  # inverse CDF of the reference law
    assert tokens.tolist() == expected
    assert int(tokens[0]) < 4
    assert sample_next(logits, None, temperature=0.0).tolist() == logits.argmax(-1).tolist()


def test_sampling_frequencies_follow_the_law():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, -1)
    tokens = sample_next(logits, torch.Generator().manual_seed(1), temperature=1.0, top_p=0.8)
    freq = torch.bincount(tokens, minlength=4).double() / tokens.numel()
    torch.testing.assert_close(freq, _reference_law(logits[:1], 1.0, 0.8)[0], atol=0.015, rtol=0)


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(1e-3, 1e4), top_p=st.floats(1e-3, 1.0), temperature=st.floats(1e-2, 10.0),
       seed=st.integers(0, 2 ** 16))
def test_sampling_is_valid_on_extreme_logits(scale, top_p, temperature, seed):
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(seed)) * scale
    logits[:, -2:] = float("-inf")
    probs = nucleus_probs(logits, temperature, top_p)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(4))
    tokens = sample_next(logits, torch.Generator().manual_seed(seed), temperature=temperature, top_p=top_p)
    assert ((tokens >= 0) & (tokens < 7)).all()
    assert (probs.gather(-1, tokens[:, None]) > 0).all()


# -- generation ------------------------------------------------------------------------------------
class Plain(torch.nn.Module):
    """The same model behind a plain forward (no key/value cache): the recomputing path."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, **inputs):
        return self.inner(**inputs)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return kdcore.create("backbone", "hf", num_classes=48, in_features=24, config=dict(TEACHER))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_generation_equals_recomputing_the_sequences(tiny, temperature):
    prompts = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0], [9, 0, 0, 0]])
    lengths = torch.tensor([4, 2, 1])
    kw = dict(max_new_tokens=6, temperature=temperature, top_p=0.9)
    a = generate(tiny, prompts, lengths, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(Plain(tiny), prompts, lengths, generator=torch.Generator().manual_seed(3), **kw)
    assert a.shape == (3, 6) and torch.equal(a, b)
    assert tiny.training  # back in the mode it was in
    # a prompt alone in its batch generates the same tokens (padding changes nothing)
    alone = generate(tiny, prompts[1:2, :2], lengths[1:2], generator=None, max_new_tokens=6, temperature=0.0)
    if temperature == 0.0:
        assert torch.equal(alone[0], a[1])


def test_generation_stops_at_eos_and_pads_after_it(tiny):
    prompts, lengths = torch.tensor([[3, 4], [5, 6]]), torch.tensor([2, 2])
    free = generate(tiny, prompts, lengths, generator=None, max_new_tokens=5, temperature=0.0)
    eos = int(free[0, 1])  # the greedy second token of row 0 becomes the EOS
    out = generate(tiny, prompts, lengths, generator=None, max_new_tokens=5, temperature=0.0,
                   eos_token_id=eos, pad_token_id=0)
    first = [int((row == eos).nonzero()[0]) if (row == eos).any() else None for row in out]
    assert first[0] is not None and first[0] <= 1
    for row, f in zip(out, first):
        if f is not None:
            assert (row[f + 1:] == 0).all()
    if all(f is not None for f in first):
        assert out.shape[1] == max(first) + 1  # stopped once every row had ended
    full = generate(tiny, prompts, lengths, generator=None, max_new_tokens=5, temperature=0.0,
                    eos_token_id=eos, pad_token_id=0, stop_early=False)  # what every rank does under DDP
    assert full.shape[1] == 5 and torch.equal(full[:, :out.shape[1]], out)
    for row, f in zip(full, first):
        if f is not None:
            assert (row[f + 1:] == 0).all()


# -- through the engine ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("op_teacher")
    conf = {"run": {"seed": 0, "epochs": 1, "batch_size": 16, "progress": "off"}, "data": dict(DATA),
            "student": {"backbone": "hf", "config": dict(TEACHER)},
            "optim": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0}, "loss": [{"name": "ce"}]}
    kdcore.train(conf, out, quiet=True)
    return str(out / "checkpoints" / "best.pt")


def _conf(ckpt, policy=None, **run):
    conf = {"run": {"seed": 3, "epochs": 1, "batch_size": 16, "progress": "off", "max_steps": 3, **run},
            "data": dict(DATA),
            "teacher": {"backbone": "hf", "config": dict(TEACHER), "checkpoint": ckpt},
            "student": {"backbone": "hf", "config": dict(STUDENT)},
            "optim": {"name": "adamw", "lr": 5e-3, "weight_decay": 0.0},
            "loss": [{"name": "ce", "weight": 0.5}, {"name": "kd", "temperature": 1.0, "weight": 0.5}]}
    if policy is not None:
        conf["batch_policy"] = {**POLICY, **policy}
    return conf


def _fit(conf):
    trainer = build_trainer(conf, None, quiet=True)
    trainer.fit()
    return trainer


def _same(a, b):
    sa, sb = a.student.state_dict(), b.student.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _context(trainer):
    return StepContext(trainer.student, trainer.teacher, trainer.progress(), trainer.config.run.seed,
                       trainer.device)


def test_lambda_0_is_an_ordinary_run_bitwise(teacher_ckpt):
    assert _same(_fit(_conf(teacher_ckpt)), _fit(_conf(teacher_ckpt, {"lmbda": 0.0})))


def test_lambda_1_trains_on_the_generated_tokens_only(teacher_ckpt):
    trainer = build_trainer(_conf(teacher_ckpt, {"lmbda": 1.0}), None, quiet=True)
    batch = next(iter(trainer.batches.epoch(torch.Generator().manual_seed(0))))
    made = trainer.batch_policy(batch, _context(trainer))
    target, ids = made.target, made.inputs["input_ids"]
    assert made.index is batch.index and len(made) == len(batch)
    assert (target[:, :3] == -100).all()  # the prompt (4 tokens: targets 0..2) carries no loss
    gen = target[:, 3:3 + POLICY["max_new_tokens"]]
    assert not torch.equal(ids[:, 4:12], batch.inputs["input_ids"][:, 4:12])  # not the data's tokens
    keep = target != -100
    assert torch.equal(target[keep], ids[:, 1:][keep[:, :-1]])
    # the student's tokens, as generate() draws them from the step's generator
    tokens, lengths = prompt_lengths(batch.inputs, batch.target, 4)
    drawn = generate(trainer.student, tokens[:, :4], lengths, max_new_tokens=8,
                     generator=_context(trainer).generator(SAMPLE, per_rank=True), eos_token_id=7)
    assert torch.equal(ids[:, 4:4 + drawn.shape[1]][gen[:, :drawn.shape[1]] != -100],
                       drawn[gen[:, :drawn.shape[1]] != -100])
    # the loss: ce over exactly the generated positions, from a plain float64 reference
    with torch.no_grad():
        logits = trainer.student(**made.inputs).logits.double()
        teacher_logits = trainer.teacher(**made.inputs).logits.double()
    logq = torch.log_softmax(logits, -1)[keep]
    ce = -logq.gather(-1, target[keep][:, None]).mean()
    logp = torch.log_softmax(teacher_logits, -1)[keep]
    kd = (logp.exp() * (logp - logq)).sum(-1).mean()
    losses = {k: v.detach() for k, v in trainer.train_step(batch).items()}
    assert float(losses["ce"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(losses["kd"]) == pytest.approx(float(kd), rel=1e-4, abs=1e-6)
    # and the step is an ordinary step on that batch
    plain = build_trainer(_conf(teacher_ckpt), None, quiet=True)
    plain.train_step(made)
    assert _same(trainer, plain)


def test_on_policy_runs_are_deterministic(teacher_ckpt):
    conf = _conf(teacher_ckpt, {"lmbda": 0.5, "temperature": 1.0, "top_p": 0.9}, max_steps=4)
    a, b = _fit(conf), _fit(conf)
    assert _same(a, b)
    conf["run"]["seed"] = 4
    assert not _same(a, _fit(conf))


def test_resume_is_exact_mid_run(teacher_ckpt, tmp_path, monkeypatch):
    conf = _conf(teacher_ckpt, {"lmbda": 0.6}, max_steps=0, epochs=2, checkpoint_every=4)  # 6 steps per epoch
    kdcore.train(conf, tmp_path / "full", quiet=True)
    original = Trainer.train_step

    def stop_at_step_9(self, *args, **kwargs):
        if self.step == 9:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", stop_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        kdcore.train(conf, tmp_path / "cut", quiet=True)
    monkeypatch.setattr(Trainer, "train_step", original)
    cut = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert (cut["step"], cut["batch_in_epoch"]) == (8, 2)  # mid-epoch
    kdcore.train(conf, tmp_path / "cut", resume=True, quiet=True)
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("full", "cut"))
    assert a["step"] == b["step"] == 12
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_lambda_follows_a_schedule():
    policy = OnPolicy(lmbda=0.8, schedule={"name": "linear", "start": 0.0, "end": 1.0})
    total = 400
    fractions = [policy.fraction(Progress(1, s, 1, total)) for s in range(total)]
    assert fractions[0] == 0.0 and fractions[200] == pytest.approx(0.4) and fractions[-1] < 0.8
    student = torch.nn.Linear(1, 1)
    sources = [policy.source(StepContext(student, None, Progress(1, s, 1, total), 0, torch.device("cpu")))
               for s in range(total)]
    first, last = sources[:total // 2].count("student"), sources[total // 2:].count("student")
    assert sources[0] == "data" and set(sources) == {"student", "data"}
    # the expected counts are sum(lambda_t) over each half; 5 standard deviations of slack
    for got, half in ((first, fractions[:total // 2]), (last, fractions[total // 2:])):
        mean, var = sum(half), sum(f * (1 - f) for f in half)
        assert abs(got - mean) < 5 * math.sqrt(var)
    over = OnPolicy(lmbda=1.0, schedule={"name": "fixed", "value": 2.0})
    with pytest.raises(kdcore.ConfigError, match=r"^batch_policy.schedule: .*outside \[0, 1\]"):
        over.fraction(Progress(1, 0, 1, 10))


def test_seq_kd_trains_on_the_teachers_generations(teacher_ckpt):
    trainer = build_trainer(_conf(teacher_ckpt, {"lmbda": 0.0, "seq_kd": True, "temperature": 0.0}), None,
                            quiet=True)
    batch = next(iter(trainer.batches.epoch(torch.Generator().manual_seed(0))))
    made = trainer.batch_policy(batch, _context(trainer))
    tokens, lengths = prompt_lengths(batch.inputs, batch.target, 4)
    by_teacher = generate(trainer.teacher, tokens[:, :4], lengths, max_new_tokens=8, generator=None,
                          temperature=0.0, eos_token_id=7)
    by_student = generate(trainer.student, tokens[:, :4], lengths, max_new_tokens=8, generator=None,
                          temperature=0.0, eos_token_id=7)
    want = completion_batch(tokens[:, :4], lengths, by_teacher, eos_token_id=7)
    assert torch.equal(made.inputs["input_ids"], want[0]["input_ids"]) and torch.equal(made.target, want[1])
    assert not torch.equal(by_teacher, by_student)
    assert math.isfinite(float(trainer.train_step(batch)["kd"].detach()))


@pytest.mark.parametrize("policy, message", [
    ({"lmbda": 1.5}, "batch_policy.lmbda: must be a number in [0, 1]"),
    ({"top_p": 0.0}, "batch_policy.top_p: must be a number in (0, 1]"),
    ({"temperature": -1.0}, "batch_policy.temperature: must be a finite number >= 0"),
    ({"max_new_tokens": 0}, "batch_policy.max_new_tokens: must be an integer >= 1"),
    ({"prompt_length": -1}, "batch_policy.prompt_length: must be an integer >= 0"),
    ({"seq_kd": "yes"}, "batch_policy.seq_kd: must be true or false"),
    ({"lambda": 0.5}, "batch_policy.lambda: unknown parameter of batch_policy 'on_policy'"),
    ({"schedule": {"name": "nosuch"}}, "batch_policy.schedule.name: unknown scheduler 'nosuch'"),
])
def test_config_errors_name_the_key_path(teacher_ckpt, policy, message):
    with pytest.raises(kdcore.ConfigError) as info:
        build_trainer(_conf(teacher_ckpt, policy), None, quiet=True)
    assert str(info.value).startswith(message)


def test_seq_kd_without_a_teacher_and_packed_rows_are_errors(teacher_ckpt):
    conf = _conf(teacher_ckpt, {"lmbda": 0.0, "seq_kd": True})
    del conf["teacher"]
    conf["loss"] = [{"name": "ce"}]
    trainer = build_trainer(conf, None, quiet=True)
    batch = next(iter(trainer.batches.epoch(torch.Generator().manual_seed(0))))
    with pytest.raises(kdcore.ConfigError, match=r"^batch_policy.seq_kd: .*no teacher"):
        trainer.train_step(batch)
    packed = batch.replace(inputs={**batch.inputs, "position_ids": torch.zeros_like(batch.inputs["input_ids"])})
    policy = OnPolicy(lmbda=1.0)
    with pytest.raises(kdcore.ConfigError, match=r"^batch_policy: on_policy needs batches of input_ids"):
        policy(packed, _context(trainer))


def test_example_runs_shortened(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = ["data.n=96", "data.length=12", "run.epochs=1"]
    kdcore.train(EXAMPLES / "lm_synthetic_teacher.toml", tmp_path / "runs" / "lm_teacher", small, quiet=True)
    summary = kdcore.train(EXAMPLES / "lm_on_policy.toml", tmp_path / "runs" / "lm_on_policy",
                           small + ["batch_policy.prompt_length=4", "batch_policy.max_new_tokens=8"], quiet=True)
    assert math.isfinite(summary["test_tv"]) and math.isfinite(summary["final"]["loss/kd"])


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_completion_batch_matches_a_per_row_reference(data):
    rows = data.draw(st.integers(1, 4))
    steps = data.draw(st.integers(1, 6))
    eos = data.draw(st.sampled_from([None, 1]))
    lengths = [data.draw(st.integers(1, 5)) for _ in range(rows)]
    prompts = torch.zeros(rows, max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        prompts[i, :n] = torch.tensor(data.draw(st.lists(st.integers(2, 9), min_size=n, max_size=n)))
    generated = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 9), min_size=steps, max_size=steps),
                                                min_size=rows, max_size=rows)))
    inputs, target = completion_batch(prompts, torch.tensor(lengths), generated, eos_token_id=eos, pad_token_id=0)
    seqs, gens = [], []
    for i, n in enumerate(lengths):
        g = generated[i].tolist()
        if eos is not None and eos in g:
            g = g[:g.index(eos) + 1]
        seqs.append(prompts[i, :n].tolist() + g)
        gens.append(len(g))
    width = max(len(s) for s in seqs)
    assert inputs["input_ids"].shape == target.shape == (rows, width)
    for i, (s, n, k) in enumerate(zip(seqs, lengths, gens)):
        assert inputs["input_ids"][i].tolist() == s + [0] * (width - len(s))
        assert inputs["attention_mask"][i].tolist() == [1] * len(s) + [0] * (width - len(s))
        assert target[i].tolist() == [s[t + 1] if n - 1 <= t < n + k - 1 else -100 for t in range(width)]


def test_prompt_completion_records_keep_their_prompts(tmp_path, tokenizer_dir, tokenizer):
    import json

    records = [{"prompt": f"tell me about the {w}", "completion": f"the {w} sat on the mat"}
               for w in ("cat", "dog", "day", "night", "park", "answer")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    conf = {"run": {"seed": 0, "epochs": 1, "batch_size": 6, "progress": "off"},
            "data": {"name": "text", "path": str(tmp_path / "train.jsonl"), "val_path": str(tmp_path / "train.jsonl"),
                     "tokenizer": str(tokenizer_dir), "max_length": 24},
            "student": {"backbone": "hf", "config": dict(STUDENT)},
            "optim": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0}, "loss": [{"name": "ce"}],
            "batch_policy": {"name": "on_policy", "lmbda": 1.0, "max_new_tokens": 6, "eos_token_id": eos,
                             "pad_token_id": pad}}
    trainer = build_trainer(conf, None, quiet=True)
    batch = next(iter(trainer.batches.epoch(torch.Generator().manual_seed(0))))
    made = trainer.batch_policy(batch, _context(trainer))
    for row, i in enumerate(batch.index.tolist()):
        prompt = tokenizer(records[i]["prompt"])["input_ids"]  # with its special tokens, as the dataset has it
        n = len(prompt)
        assert made.inputs["input_ids"][row, :n].tolist() == prompt
        assert (made.target[row, :n - 1] == -100).all() and made.target[row, n - 1] != -100
        kept = made.target[row][made.target[row] != -100].tolist()
        assert 1 <= len(kept) <= 6 and (eos not in kept[:-1])  # nothing after the first EOS
        assert int(made.inputs["attention_mask"][row].sum()) == n + len(kept)
    assert math.isfinite(float(trainer.train_step(batch)["ce"].detach()))
