"""Dataset text on untrusted inputs: a huge document is tokenized only as far as max_length
needs (same ids as the whole document cut), lines that are not UTF-8 and lone surrogates are
one-line config errors naming the file and line."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

import kdcore
from kdcore.cli.commands import main
from kdcore_lm.text import WINDOW_CHARS_PER_TOKEN, Encoder, text

spec = importlib.util.spec_from_file_location("helpers_lm", Path(__file__).with_name("helpers_lm.py"))
H = importlib.util.module_from_spec(spec)
spec.loader.exec_module(H)

#: pieces of the generated documents: known words, unknown words, a 300-character "word" (one
#: [UNK] of the word-level tokenizer, many tokens of the BPE), punctuation, runs of blanks, non-ASCII
PIECES = list(H.WORDS) + ["zebra", "qwerty", "x" * 300, ",", ".", "!?", "\n", "   ", "\t", "héllo", "日本語",
                          "🙂"]


def document(seed: int, n: int = 2000) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(PIECES) for _ in range(n))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE tokenizer trained here on generated text (tokens of several characters,
    GPT-2's pre-tokenizer), with an end-of-text token and the helpers' chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([document(s, 200) for s in range(20)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = H.CHAT_TEMPLATE
    return fast


def records(seed: int) -> list[dict]:
    a, b = document(seed), document(seed + 100)
    assert min(len(a), len(b)) > 10_000
    return [{"text": a}, {"prompt": a[:40], "completion": b}, {"prompt": a, "completion": b},
            {"messages": [{"role": "user", "content": a[:300]}, {"role": "assistant", "content": b},
                          {"role": "user", "content": "why"}, {"role": "assistant", "content": a}]}]


class Spy:
    """A tokenizer that records the length of every text it is given."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, text, **kw):
        self.lengths.append(len(text))
        return self.tok(text, **kw)


@pytest.mark.parametrize("which", ["wordlevel", "bpe"])
@pytest.mark.parametrize("max_length", [2, 3, 7, 16, 50, 130])
def test_windows_give_the_whole_documents_ids_cut_to_max_length(which, max_length, tokenizer, bpe):
    tok = tokenizer if which == "wordlevel" else bpe
    whole = Encoder(tok, 4096)
    for seed in range(3):
        for rec in records(seed):
            spy = Spy(tok)
            ids, loss = Encoder(spy, max_length)(rec, "x")
            want_ids, want_loss = whole(rec, "x")
            assert ids[:max_length] == want_ids[:max_length] and loss[:max_length] == want_loss[:max_length]
            assert len(want_ids) > max_length  # every record here is cut
            assert max(spy.lengths) < 10_000  # and the documents were tokenized in windows, never whole
    doc = document(0)
    assert 4096 * WINDOW_CHARS_PER_TOKEN > len(doc)  # the reference tokenized the whole document
    want = ([tok.bos_token_id] if which == "wordlevel" else []) + tok(doc, add_special_tokens=False)["input_ids"]
    assert Encoder(tok, max_length)({"text": doc}, "x")[0][:max_length] == want[:max_length]


MEASURE = """
import json, resource, sys
from kdcore_lm.text import text
small, big, tokenizer = sys.argv[1:4]
text(small, tokenizer, max_length=64, split=[1.0, 0.0, 0.0])  # imports done, the tokenizer loaded once
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
d = text(big, tokenizer, max_length=64, split=[1.0, 0.0, 0.0])
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"grown_kib": grown, "ids": d.train.inputs["input_ids"][0].tolist(), **d.meta}))
"""


def test_a_40_mb_single_line_document_loads_in_bounded_memory(tmp_path, tokenizer_dir, tokenizer):
    chunk = " ".join(itertools.islice(itertools.cycle(H.WORDS), 200_000))
    doc = " ".join([chunk] * (40_000_000 // len(chunk) + 1))
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": doc}) + "\n")
    assert (tmp_path / "big.jsonl").stat().st_size > 40_000_000
    H.write_jsonl(tmp_path / "small.jsonl", [{"text": "the cat sat"}])
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "small.jsonl"), str(tmp_path / "big.jsonl"),
                          str(tokenizer_dir)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    # the whole document as tokens: about 9 million ids, gigabytes in the tokenizer (4.4 GB measured)
    assert got["grown_kib"] < 1024 * 1024, got["grown_kib"]
    want = [tokenizer.bos_token_id] + tokenizer(" ".join(H.WORDS * 3), add_special_tokens=False)["input_ids"]
    assert got["ids"] == want[:64] and got["truncated"] == 1


def write_config(tmp_path, data) -> Path:
    conf = {"run": {"seed": 0, "epochs": 1, "batch_size": 4, "progress": "off"}, "data": data,
            "student": {"backbone": "hf", "config": dict(H.TINY["llama"])},
            "optim": {"name": "adamw", "lr": 1e-3}, "loss": [{"name": "ce"}]}
    path = tmp_path / "run.toml"
    path.write_text(tomli_w.dumps(conf))
    return path


def train_error(tmp_path, capsys, data) -> tuple[int, str]:
    code = main(["train", str(write_config(tmp_path, data)), "--out", str(tmp_path / "run"), "--quiet"])
    return code, capsys.readouterr().err


def test_a_line_that_is_not_utf8_is_one_line_naming_file_and_line(tmp_path, tokenizer_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "the cat"}\n{"text": "a \xff dog"}\n')
    code, err = train_error(tmp_path, capsys, {"name": "text", "path": str(bad), "tokenizer": str(tokenizer_dir),
                                               "max_length": 8})
    assert code == 2
    assert err == f"kdcore: error: data.path: {bad} line 2: not valid UTF-8 (byte 0xff at byte 13 of the line); " \
                  "save the file as UTF-8\n"
    bad.write_bytes(b"\xef\xbb\xbf" + b'{"text": "the cat"}\n')  # a byte-order mark is UTF-8
    assert len(text(str(bad), str(tokenizer_dir), max_length=8, split=[1.0, 0.0, 0.0]).train) == 1


def test_a_lone_surrogate_is_one_line_naming_file_line_and_field(tmp_path, tokenizer_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n\n{"text": "the \\ud83d\\ude00 cat", "id": "\\udfff"}\n'
                   '{"text": "a \\ud800 dog"}\n')
    code, err = train_error(tmp_path, capsys, {"name": "text", "path": str(bad), "tokenizer": str(tokenizer_dir),
                                               "max_length": 8})
    assert code == 2  # line 3: a pair is one character and "id" is never tokenized
    assert err == f"kdcore: error: data.path: {bad} line 4: text holds a lone surrogate \\ud800 (half of a UTF-16 " \
                  "pair, not a character); fix or remove it\n"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udc00"}]}\n')
    with pytest.raises(kdcore.ConfigError) as info:
        text(str(bad), str(tokenizer_dir), val_path=str(bad))
    assert str(info.value) == f"path: {bad} line 1: messages[1].content holds a lone surrogate \\udc00 (half of a " \
                              "UTF-16 pair, not a character); fix or remove it"


def test_a_fifo_is_refused_without_blocking(tmp_path, tokenizer_dir):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(kdcore.ConfigError) as info:
        text(str(fifo), str(tokenizer_dir))
    assert str(info.value) == f"path: {fifo} is not a regular file; give a JSONL file"
