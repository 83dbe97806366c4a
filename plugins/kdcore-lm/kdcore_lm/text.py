"""Dataset ``text``: local JSONL files tokenized with a local tokenizer.

Each line is one JSON object, in one of three forms (found per line):

- ``{"text": ...}``: loss on every token (an end-of-sequence token is appended
  where the tokenizer has one and ``add_eos`` is true);
- ``{"prompt": ..., "completion": ...}``: loss on the completion (and its
  end-of-sequence token) only; the prompt is tokenized with the tokenizer's
  special tokens, the completion without;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the
  tokenizer's chat template; loss on the assistant turns only (each assistant
  message's tokens, found from the template's renderings of the conversation up
  to it, which must be prefixes of one another).

Targets follow kdcore's convention: already shifted, ``target[t]`` is the token
at ``t + 1`` where that token carries loss, ``-100`` elsewhere (prompt, user
turns, padding, and the last position of every document). Documents longer
than ``max_length`` are cut to their first ``max_length`` tokens; documents
left with no target are dropped (counted in ``meta["dropped"]``).

Files are read line by line and a document is never tokenized whole when
``max_length`` needs only its beginning: each text is tokenized in windows
of growing length (:meth:`Encoder.first_tokens`), so a 40 MB document costs
what its first ``max_length`` tokens cost. Lines that are not UTF-8, and
strings that hold a lone surrogate (a ``\\ud800`` escape), are config errors
naming the file and line.

Without packing every document is one row, right-padded to ``max_length``
(inputs ``input_ids`` and ``attention_mask``). With ``packing = true``
documents are laid end to end into rows of ``max_length`` (whole documents
only, in order; a row holds as many as fit), and the inputs are
``input_ids`` and ``position_ids`` restarting at 0 for every document: the
``hf`` backbone then attends within each document only (transformers builds
the block-diagonal causal mask from the position restarts), and no target
crosses a document boundary.
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kdcore.common import params
from kdcore.common.errors import ConfigError
from kdcore.data import DataSplits, TensorSplit

IGNORE_INDEX = -100
#: characters per token of the first window a text is tokenized in (doubled while too few tokens)
WINDOW_CHARS_PER_TOKEN = 8
#: tokens a window must hold past those kept: a window's cut changes only the tokens next to it
WINDOW_MARGIN = 32
#: the fields of a record that are tokenized
TEXT_FIELDS = ("text", "prompt", "completion", "messages")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def load_tokenizer(path: str, where: str = "tokenizer"):
    """A tokenizer from a local directory (never a download)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"{where}: tokenizer directory not found: {path} (save one with "
                          "tokenizer.save_pretrained(DIR), or download it first)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{where}: cannot load a tokenizer from {path}: {first}") from None


def _check_file(p: Path, path: str, where: str) -> None:
    """A config error unless ``p`` is a regular file (a FIFO or a device would block or never end)."""
    if not p.exists():
        raise ConfigError(f"{where}: file not found: {path}")
    if not p.is_file():
        raise ConfigError(f"{where}: {path} is not a regular file; give a JSONL file")


def _decode_line(raw: bytes, first: bool, at: str) -> str:
    """One line of the file as text; a config error naming the line's first byte that is not UTF-8."""
    if first and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{at}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the "
                          "line); save the file as UTF-8") from None


def _lone_surrogate(value: Any, field: str) -> tuple[str, str] | None:
    """The field and character of the first lone surrogate in ``value``'s strings (JSON lets
    ``"\\ud800"`` through; no tokenizer takes it), or None."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        return (field, found.group()) if found else None
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        hit = _lone_surrogate(item, f"{field}.{key}" if isinstance(key, str) else f"{field}[{key}]")
        if hit:
            return hit
    return None


def read_jsonl(path: str, where: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """The records of a JSONL file with their line numbers, read one line at a time (the file is
    never held whole). Errors name the file and line."""
    p = Path(path).expanduser()
    _check_file(p, path, where)
    found = False
    with p.open("rb") as f:
        for i, raw in enumerate(f, 1):
            at = f"{where}: {path} line {i}"
            line = _decode_line(raw, i == 1, at)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{at}: invalid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ConfigError(f"{at}: expected a JSON object, got {type(rec).__name__}")
            found = True
            yield i, rec
    if not found:
        raise ConfigError(f"{where}: {path} holds no records")


class Encoder:
    """Turns a record into token ids and a per-token loss flag (the token is a target)."""

    def __init__(self, tokenizer, max_length: int, add_eos: bool = True):
        self.tok = tokenizer
        self.max_length = max_length
        self.eos = tokenizer.eos_token_id if add_eos else None

    def first_tokens(self, text: str, special: bool, offsets: bool = False) -> tuple[list[int], list | None]:
        """The ids (and character offsets) of ``text``'s first ``max_length`` tokens, all of them
        when it has fewer, without tokenizing the whole of a long text: windows of
        ``max_length * WINDOW_CHARS_PER_TOKEN`` characters, doubled until a window holds
        ``WINDOW_MARGIN`` tokens more than are kept (a token may cover many characters), so the
        kept tokens lie away from the window's cut and equal the whole text's."""
        size = self.max_length * WINDOW_CHARS_PER_TOKEN
        while True:
            whole = size >= len(text)
            enc = self.tok(text if whole else text[:size], add_special_tokens=special,
                           return_offsets_mapping=offsets)
            ids = list(enc["input_ids"])
            spans = list(enc["offset_mapping"]) if offsets else None
            if whole:
                return ids, spans
            if len(ids) >= self.max_length + WINDOW_MARGIN:
                return ids[:self.max_length], spans[:self.max_length] if offsets else None
            size *= 2

    def ids(self, text: str, special: bool) -> list[int]:
        """The ids of ``text``'s first ``max_length`` tokens (see :meth:`first_tokens`)."""
        return self.first_tokens(text, special)[0]

    def with_eos(self, ids: list[int]) -> list[int]:
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            return ids + [self.eos]
        return ids

    def __call__(self, rec: Mapping[str, Any], where: str) -> tuple[list[int], list[bool]]:
        hit = _lone_surrogate({k: v for k, v in rec.items() if k in TEXT_FIELDS}, "")
        if hit:
            raise ConfigError(f"{where}: {hit[0].lstrip('.')} holds a lone surrogate \\u{ord(hit[1]):04x} (half of a "
                              "UTF-16 pair, not a character); fix or remove it")
        if "messages" in rec:
            return self.chat(rec["messages"], where)
        if "prompt" in rec or "completion" in rec:
            prompt, completion = rec.get("prompt"), rec.get("completion")
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise ConfigError(f"{where}: 'prompt' and 'completion' must both be strings")
            p = self.ids(prompt, True)
            c = self.with_eos(self.ids(completion, False))
            return p + c, [False] * len(p) + [True] * len(c)
        if "text" in rec:
            if not isinstance(rec["text"], str):
                raise ConfigError(f"{where}: 'text' must be a string")
            ids = self.with_eos(self.ids(rec["text"], True))
            return ids, [True] * len(ids)
        raise ConfigError(f"{where}: a record needs 'text', 'prompt' and 'completion', or 'messages' "
                          f"(got keys {sorted(rec)})")

    def render(self, messages, where: str, **kwargs) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, **kwargs)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{where}: the tokenizer's chat template cannot render these messages: {exc}") from None
        except Exception as exc:  # jinja2 errors (e.g. raise_exception in the template)
            raise ConfigError(f"{where}: chat template error: {exc}") from None

    def chat(self, messages, where: str) -> tuple[list[int], list[bool]]:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        if not getattr(self.tok, "chat_template", None):
            raise ConfigError(f"{where}: the tokenizer has no chat template (set tokenizer.chat_template and "
                              "save it, or use prompt/completion records)")
        full = self.render(messages, where)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = self.render(messages[:i], where, add_generation_prompt=True) if i else ""
            end = self.render(messages[:i + 1], where)
            if not (full.startswith(end) and end.startswith(start)):
                raise ConfigError(f"{where}: the chat template's renderings are not prefixes of one another; "
                                  "cannot find the assistant turns (use prompt/completion records)")
            spans.append((len(start), len(end)))
        ids, offsets = self.first_tokens(full, False, offsets=True)
        loss = [any(a <= s < b for a, b in spans) for s, _ in offsets]
        if self.eos is not None and (not ids or ids[-1] != self.eos) and messages[-1]["role"] == "assistant":
            ids, loss = ids + [self.eos], loss + [True]
        return ids, loss


def shifted(ids: Sequence[int], loss: Sequence[bool]) -> list[int]:
    """Targets of one document: ``target[t] = ids[t + 1]`` where that token carries loss, else -100
    (always -100 at the last position)."""
    return [ids[t + 1] if loss[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def _rows(docs: list[tuple[list[int], list[int]]], max_length: int, pad_id: int, packing: bool) -> TensorSplit:
    if not packing:
        n = len(docs)
        ids = torch.full((n, max_length), pad_id, dtype=torch.long)
        target = torch.full((n, max_length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, max_length), dtype=torch.long)
        for i, (d, t) in enumerate(docs):
            ids[i, :len(d)] = torch.tensor(d)
            target[i, :len(t)] = torch.tensor(t)
            mask[i, :len(d)] = 1
        return TensorSplit({"input_ids": ids, "attention_mask": mask}, target)
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    used = 0
    for d, t in docs:
        if used + len(d) > max_length and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append((d, t))
        used += len(d)
    n = len(rows)
    ids = torch.full((n, max_length), pad_id, dtype=torch.long)
    target = torch.full((n, max_length), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((n, max_length), dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for d, t in row:
            ids[i, at:at + len(d)] = torch.tensor(d)
            target[i, at:at + len(t)] = torch.tensor(t)
            pos[i, at:at + len(d)] = torch.arange(len(d))
            at += len(d)
        pos[i, at:] = torch.arange(max_length - at)  # the padding tail is a segment of its own
    return TensorSplit({"input_ids": ids, "position_ids": pos}, target)


def _check_split(split) -> tuple[float, float, float]:
    if not isinstance(split, Sequence) or isinstance(split, str) or len(split) != 3 \
            or any(isinstance(s, bool) or not isinstance(s, (int, float)) or s < 0 for s in split) \
            or abs(sum(split) - 1.0) > 1e-6:
        raise ConfigError(f"split: must be three non-negative fractions summing to 1, got {split!r}")
    return tuple(float(s) for s in split)


def text(path: str, tokenizer: str, max_length: int = 512, packing: bool = False, val_path: str | None = None,
         test_path: str | None = None, split: Sequence[float] = (0.9, 0.05, 0.05), seed: int = 0,
         limit: int = 0, add_eos: bool = True) -> DataSplits:
    """JSONL ``path`` (and optional ``val_path`` / ``test_path``) tokenized with the local
    ``tokenizer`` directory. Without ``val_path`` and ``test_path``, ``path``'s records are
    shuffled with ``seed`` and cut by ``split``. ``limit`` > 0 keeps the first ``limit``
    records of each file. ``num_classes`` is the tokenizer's size (``len(tokenizer)``)."""
    params.positive_int("max_length", max_length)
    if max_length < 2:
        raise ConfigError(f"max_length: must be at least 2, got {max_length}")
    if not isinstance(packing, bool):
        raise ConfigError(f"packing: must be true or false, got {packing!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ConfigError(f"limit: must be a non-negative integer, got {limit!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed: must be an integer, got {seed!r}")
    fractions = _check_split(split)
    tok = load_tokenizer(tokenizer)
    encoder = Encoder(tok, max_length, add_eos=add_eos)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    stats = {"documents": 0, "dropped": 0, "truncated": 0}

    def encode(file: str, key: str) -> list[tuple[list[int], list[int]]]:
        docs = []
        for line, rec in itertools.islice(read_jsonl(file, key), limit or None):
            ids, loss = encoder(rec, f"{key}: {file} line {line}")
            if len(ids) > max_length:
                ids, loss = ids[:max_length], loss[:max_length]
                stats["truncated"] += 1
            t = shifted(ids, loss)
            if all(v == IGNORE_INDEX for v in t):
                stats["dropped"] += 1
                continue
            docs.append((ids, t))
        stats["documents"] += len(docs)
        return docs

    train = encode(path, "path")
    if val_path is None and test_path is None:
        if fractions[0] < 1.0:  # shuffled before cutting (all in train: the file's order)
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
            train = [train[i] for i in order]
        n = len(train)
        n_train, n_val = int(round(fractions[0] * n)), int(round(fractions[1] * n))
        parts = [train[:n_train], train[n_train:n_train + n_val], train[n_train + n_val:]]
    else:
        parts = [train, encode(val_path, "val_path") if val_path else [],
                 encode(test_path, "test_path") if test_path else []]
    if not parts[0]:
        raise ConfigError(f"path: {path} leaves no training document with a target")
    splits = [_rows(p, max_length, pad_id, packing) if p else None for p in parts]
    return DataSplits(*splits, num_classes=len(tok), input_shape=(max_length,),
                      meta={"tokenizer": str(tokenizer), "pad_token_id": pad_id, **stats})
