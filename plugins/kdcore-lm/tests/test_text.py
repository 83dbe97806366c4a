"""Dataset text: the three record forms, the shift, prompt masking, truncation, packing, errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import kdcore
from kdcore_lm.text import text

spec = importlib.util.spec_from_file_location("helpers_lm", Path(__file__).with_name("helpers_lm.py"))
H = importlib.util.module_from_spec(spec)
spec.loader.exec_module(H)


def ids_of(tokenizer, s, special=False):
    return tokenizer(s, add_special_tokens=special)["input_ids"]


def single(tmp_path, tokenizer_dir, records, **kw):
    path = H.write_jsonl(tmp_path / "d.jsonl", records)
    kw.setdefault("split", [1.0, 0.0, 0.0])
    return text(str(path), str(tokenizer_dir), **kw)


def test_text_records_shift_by_one(tmp_path, tokenizer_dir, tokenizer):
    d = single(tmp_path, tokenizer_dir, [{"text": "the cat sat on the mat"}], max_length=16)
    row, target = d.train.inputs["input_ids"][0], d.train.targets[0]
    want = [tokenizer.bos_token_id] + ids_of(tokenizer, "the cat sat on the mat") + [tokenizer.eos_token_id]
    n = len(want)
    assert row[:n].tolist() == want and (row[n:] == tokenizer.pad_token_id).all()
    assert target[:n - 1].tolist() == want[1:]  # target at t is the token at t + 1
    assert (target[n - 1:] == -100).all()  # the last position and the padding carry no loss
    assert d.train.inputs["attention_mask"][0].tolist() == [1] * n + [0] * (16 - n)
    assert d.num_classes == len(tokenizer) and d.input_shape == (16,)


def test_prompt_is_masked_and_completion_kept(tmp_path, tokenizer_dir, tokenizer):
    d = single(tmp_path, tokenizer_dir, [{"prompt": "tell me about the dog", "completion": "the dog ran"}],
               max_length=20)
    p = [tokenizer.bos_token_id] + ids_of(tokenizer, "tell me about the dog")
    c = ids_of(tokenizer, "the dog ran") + [tokenizer.eos_token_id]
    target = d.train.targets[0].tolist()
    assert d.train.inputs["input_ids"][0, :len(p) + len(c)].tolist() == p + c
    assert target[:len(p) - 1] == [-100] * (len(p) - 1)  # no loss on predicting prompt tokens
    assert target[len(p) - 1:len(p) + len(c) - 1] == c  # the last prompt position predicts the completion
    assert all(v == -100 for v in target[len(p) + len(c) - 1:])


def test_chat_template_and_assistant_only_loss(tmp_path, tokenizer_dir, tokenizer):
    messages = [{"role": "system", "content": "be good"}, {"role": "user", "content": "who is the cat"},
                {"role": "assistant", "content": "the big cat"}, {"role": "user", "content": "why"},
                {"role": "assistant", "content": "no answer"}]
    d = single(tmp_path, tokenizer_dir, [{"messages": messages}], max_length=40)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    full = ids_of(tokenizer, rendered)
    row = d.train.inputs["input_ids"][0]
    assert row[:len(full)].tolist() == full
    kept = [tokenizer.convert_ids_to_tokens(int(t)) for t in d.train.targets[0] if t != -100]
    assert kept == ["the", "big", "cat", "</s>", "no", "answer", "</s>"]


def test_truncation_keeps_the_first_tokens_and_drops_documents_without_targets(tmp_path, tokenizer_dir, tokenizer):
    long = " ".join(["one two three"] * 10)
    d = single(tmp_path, tokenizer_dir, [{"text": long}, {"prompt": "one two three four five", "completion": "yes"},
                                         {"text": "good day"}], max_length=6)
    assert d.meta["truncated"] == 2 and d.meta["dropped"] == 1  # the prompt fills all 6 tokens
    assert len(d.train) == 2
    first = d.train.inputs["input_ids"][0].tolist()
    assert first == ([tokenizer.bos_token_id] + ids_of(tokenizer, long))[:6]
    assert d.train.targets[0].tolist() == first[1:] + [-100]


def test_packing_never_crosses_documents(tmp_path, tokenizer_dir, tokenizer):
    docs = [{"text": "the cat sat"}, {"prompt": "who ran", "completion": "the dog"}, {"text": "big red mat"},
            {"text": "one two three four five six"}]
    d = single(tmp_path, tokenizer_dir, docs, max_length=12, packing=True)
    inputs, targets = d.train.inputs, d.train.targets
    assert set(inputs) == {"input_ids", "position_ids"}
    # documents of 5, 6, 5 and 8 tokens (bos + words + eos) in rows of 12: [5 + 6] [5] [8]
    pos = inputs["position_ids"]
    assert pos.shape == (3, 12)
    starts = [(r, c) for r in range(3) for c in range(12) if pos[r, c] == 0]
    assert starts == [(0, 0), (0, 5), (0, 11), (1, 0), (1, 5), (2, 0), (2, 8)]  # padding tails restart too
    for r in range(3):
        row_t, row_p = targets[r].tolist(), pos[r].tolist()
        for c in range(11):
            if row_p[c + 1] == 0:  # the last token of a document predicts nothing
                assert row_t[c] == -100
    total_kept = int((targets != -100).sum())
    unpacked = single(tmp_path, tokenizer_dir, docs, max_length=12)
    assert total_kept == int((unpacked.train.targets != -100).sum())
    assert len(d.train) < len(unpacked.train)


def test_packed_rows_equal_the_documents_alone(tmp_path, tokenizer_dir, tokenizer):
    docs = [{"text": "the cat sat on the mat"}, {"text": "a dog ran in the park"}]
    d = single(tmp_path, tokenizer_dir, docs, max_length=24, packing=True)
    torch.manual_seed(0)
    model = kdcore.create("backbone", "hf", num_classes=d.num_classes, config=dict(H.TINY["llama"])).eval()
    with torch.no_grad():
        packed = model(**{k: v[:1] for k, v in d.train.inputs.items()}).logits[0]
        start = int((d.train.inputs["position_ids"][0] == 0).nonzero()[1])
        second = d.train.inputs["input_ids"][0, start:start + 8].unsqueeze(0)
        alone = model(input_ids=second).logits[0]
    torch.testing.assert_close(packed[start:start + 8], alone, atol=1e-5, rtol=1e-5)


def test_separate_files_and_split(tmp_path, tokenizer_dir):
    records = [{"text": f"the {w}"} for w in ("cat", "dog", "mat", "park", "day", "night", "yes", "no", "one", "two")]
    train = H.write_jsonl(tmp_path / "train.jsonl", records)
    val = H.write_jsonl(tmp_path / "val.jsonl", records[:3])
    d = text(str(train), str(tokenizer_dir), max_length=8, val_path=str(val))
    assert (len(d.train), len(d.val), d.test) == (10, 3, None)
    d = text(str(train), str(tokenizer_dir), max_length=8, split=[0.8, 0.1, 0.1], seed=1)
    assert (len(d.train), len(d.val), len(d.test)) == (8, 1, 1)
    d2 = kdcore.create("dataset", "text", path=str(train), tokenizer=str(tokenizer_dir), max_length=8,
                       split=[0.8, 0.1, 0.1], seed=1, limit=10)
    assert torch.equal(d.train.inputs["input_ids"], d2.train.inputs["input_ids"])


def test_errors_name_the_file_and_line(tmp_path, tokenizer_dir):
    with pytest.raises(kdcore.ConfigError, match="tokenizer: tokenizer directory not found"):
        text(str(tmp_path / "x.jsonl"), str(tmp_path / "no-tok"))
    with pytest.raises(kdcore.ConfigError, match="path: file not found"):
        text(str(tmp_path / "x.jsonl"), str(tokenizer_dir))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"txt": "no"}\n')
    with pytest.raises(kdcore.ConfigError, match=r"bad.jsonl line 2: a record needs 'text'"):
        text(str(bad), str(tokenizer_dir))
    bad.write_text('{"text": "the cat"}\n{oops\n')
    with pytest.raises(kdcore.ConfigError, match=r"bad.jsonl line 2: invalid JSON"):
        text(str(bad), str(tokenizer_dir))
