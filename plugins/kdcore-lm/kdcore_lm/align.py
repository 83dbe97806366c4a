"""Aligning two tokenisations of one text, and moving a teacher's next-token law onto
the student's vocabulary (cross-tokenizer distillation, docs/lm.md).

A :class:`Vocabulary` turns ids into text with each token's character span and
back. :func:`align` pairs every student position with the teacher position
that predicts the same stretch of text: the student's next token starts where
its current token ends (offset ``b``); the teacher token that covers ``b``
(the first whose span ends after ``b``) starts at ``c <= b``, and the teacher
position before it predicts that token. The student tokens that lie between
``c`` and ``b`` are the pieces of that teacher token the student has already
seen (none where the boundaries coincide). A student token that straddles
``c``, or a teacher token with no position before it, leaves the student
position unserved.

:class:`Projection` moves the teacher's probabilities onto the student's
vocabulary. Each teacher token's text is tokenised by the student's tokenizer
into pieces; with ``match = "prefix"`` the teacher's probability of a token
goes to its next unseen piece, among the teacher tokens whose pieces begin
with the pieces already seen (so probabilities merge where several teacher
tokens start with one student token, and split where a student position sits
inside a teacher token). ``match = "exact"`` keeps only teacher tokens whose
text is exactly one student token (at coinciding boundaries only). The mass
that no student token receives (special tokens, teacher tokens ending exactly
at the seen pieces, tokens without an exact match) is dropped and the rest
renormalised; a position that receives no mass is unserved. At a coinciding
boundary the unplaced mass may instead be spread evenly over the student tokens
no teacher token reaches there (``unplaced = "spread"``: with ``match = "exact"``
the student's tokens that the teacher spells otherwise keep some probability).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from kdcore.common.errors import ConfigError

Span = tuple[int, int]
MATCHES = ("prefix", "exact", "none")
UNPLACED = ("renormalize", "spread")


class Vocabulary:
    """A tokenizer as the alignment sees it: ``strings[i]`` is token ``i``'s text ("" for
    special tokens, which carry none), ``index`` maps a text to its (first) token;
    :meth:`encode` and :meth:`decode` give character spans."""

    strings: list[str]
    index: dict[str, int]

    def __len__(self) -> int:
        return len(self.strings)

    def encode(self, text: str, specials: bool = True) -> tuple[list[int], list[Span]]:
        """The ids of ``text`` and each one's ``(start, end)`` span (empty for special tokens);
        ``specials``: with the tokenizer's added special tokens (e.g. a BOS)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> tuple[str, list[Span]] | None:
        """The text of ``ids`` and each id's span, or None where the text does not
        tokenise back to ``ids`` (then no span is trustworthy)."""
        raise NotImplementedError

    def pieces(self, text: str) -> list[int] | None:
        """``text`` as this vocabulary's tokens (no special tokens), or None where they do not cover it."""
        ids, spans = self.encode(text, specials=False)
        covered = sum(e - a for a, e in spans)
        return ids if ids and covered == len(text) else None


class CharVocabulary(Vocabulary):
    """A vocabulary of literal strings: encoding takes the longest token at each offset
    (characters no token starts with are skipped), decoding concatenates. The
    tokenizers of ``synthetic_lm`` tokenised two ways are of this kind."""

    def __init__(self, strings: Sequence[str]):
        self.strings = list(strings)
        self.index = {s: i for i, s in reversed(list(enumerate(self.strings))) if s}
        self.longest = max((len(s) for s in self.strings), default=1)

    def encode(self, text: str, specials: bool = True) -> tuple[list[int], list[Span]]:
        ids, spans, i = [], [], 0
        while i < len(text):
            for size in range(min(self.longest, len(text) - i), 0, -1):
                token = self.index.get(text[i:i + size])
                if token is not None:
                    ids.append(token)
                    spans.append((i, i + size))
                    i += size
                    break
            else:
                i += 1
        return ids, spans

    def decode(self, ids: Sequence[int]) -> tuple[str, list[Span]]:
        spans, at = [], 0
        for token in ids:
            spans.append((at, at + len(self.strings[token])))
            at += len(self.strings[token])
        return "".join(self.strings[t] for t in ids), spans


class HFVocabulary(Vocabulary):
    """A Hugging Face fast tokenizer (offsets from ``return_offsets_mapping``). Decoding
    checks the round trip: the decoded text must tokenise back to the same non-special ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        self.strings = ["" if i in self.special else tokenizer.decode([i]) for i in range(len(tokenizer))]
        self.index = {s: i for i, s in reversed(list(enumerate(self.strings))) if s}

    @classmethod
    def load(cls, path: str, key: str) -> "HFVocabulary":
        """The tokenizer saved in directory ``path`` (never downloaded); errors name ``key``."""
        p = Path(path).expanduser()
        if not p.is_dir():
            raise ConfigError(f"{key}: tokenizer directory not found: {path}; save the tokenizer there first "
                              f"(tokenizer.save_pretrained({path!r}), or `hf download <org>/<model> --local-dir "
                              f"{path}`)")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0].rstrip(": ")
            raise ConfigError(f"{key}: cannot load a tokenizer from {path} ({first}); save the tokenizer there "
                              f"again with tokenizer.save_pretrained({path!r})") from None
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"{key}: the tokenizer in {path} is not a fast tokenizer (character offsets "
                              "need one); save it with tokenizers installed")
        return cls(tokenizer)

    def encode(self, text: str, specials: bool = True) -> tuple[list[int], list[Span]]:
        enc = self.tokenizer(text, add_special_tokens=specials, return_offsets_mapping=True)
        spans = [(0, 0) if i in self.special else (int(a), int(b))
                 for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
        return list(enc["input_ids"]), spans

    def decode(self, ids: Sequence[int]) -> tuple[str, list[Span]] | None:
        ids = [int(i) for i in ids]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        plain, spans = self.encode(text, specials=False)
        if plain != [i for i in ids if i not in self.special]:
            return None
        out, nxt = [], iter(spans)
        for i in ids:
            out.append(None if i in self.special else next(nxt))
        end = len(text)
        for j in range(len(out) - 1, -1, -1):  # a special token sits where the next text starts
            if out[j] is None:
                out[j] = (end, end)
            else:
                end = out[j][0]
        return text, out


def vocabulary(spec, key: str) -> Vocabulary:
    """The :class:`Vocabulary` a config gives under ``key``: a local tokenizer directory, or
    ``{ name = "synthetic_lm", side = "teacher" | "student", vocab_size, split_tokens }``."""
    if isinstance(spec, str) and spec:
        return HFVocabulary.load(spec, key)
    if isinstance(spec, Mapping) and spec.get("name") == "synthetic_lm":
        from kdcore_lm.synthetic import split_vocabulary

        params = {k: v for k, v in spec.items() if k != "name"}
        try:
            return split_vocabulary(**params)
        except ConfigError as exc:
            raise exc.with_path(key) from None
        except TypeError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    if spec is None:
        raise ConfigError(f"{key}: required: a local tokenizer directory (save one with "
                          "tokenizer.save_pretrained(DIR)), or { name = \"synthetic_lm\", side = \"teacher\", "
                          "vocab_size = ..., split_tokens = ... } for synthetic_lm tokenised two ways")
    raise ConfigError(f"{key}: expected a local tokenizer directory or a synthetic_lm table, got {spec!r}")


class Projection:
    """Where each teacher token's probability goes at each alignment node (see the module
    docstring): node 0 is a coinciding boundary, node ``n > 0`` a tuple of student pieces
    already seen inside a teacher token. ``nodes`` maps those tuples to node numbers."""

    def __init__(self, teacher: Vocabulary, student: Vocabulary, match: str = "prefix"):
        if match not in MATCHES:
            raise ConfigError(f"match: must be one of {', '.join(MATCHES)}, got {match!r}")
        self.match, self.width = match, len(teacher) if match == "none" else len(student)
        self.nodes: dict[tuple[int, ...], int] = {(): 0}
        triples = self._triples(teacher, student)
        triples.sort()
        table = torch.tensor(triples, dtype=torch.long).reshape(-1, 3)
        self.teacher_ids, self.student_ids = table[:, 1], table[:, 2]
        counts = torch.bincount(table[:, 0], minlength=len(self.nodes))
        self.starts = [0, *torch.cumsum(counts, 0).tolist()]
        reached = set(self.student_ids[:self.starts[1]].tolist())
        names = teacher.strings if match == "none" else student.strings
        #: the tokens of the output vocabulary (with text) that no teacher token reaches at a boundary
        self.orphans = torch.tensor([i for i, text in enumerate(names) if text and i not in reached],
                                    dtype=torch.long)

    def _triples(self, teacher: Vocabulary, student: Vocabulary) -> list[tuple[int, int, int]]:
        """``(node, teacher id, output id)`` for each teacher token with text, by ``match``
        (adding the nodes of the pieces seen inside teacher tokens as they come)."""
        out = []
        for w, text in enumerate(teacher.strings):
            if not text:
                continue
            if self.match == "none":
                out.append((0, w, w))
            elif self.match == "exact":
                if text in student.index:
                    out.append((0, w, student.index[text]))
            else:
                pieces = student.pieces(text) or []
                for m in range(len(pieces)):
                    node = self.nodes.setdefault(tuple(pieces[:m]), len(self.nodes))
                    out.append((node, w, pieces[m]))
        return out

    def node(self, seen: tuple[int, ...]) -> int:
        """The node of the student pieces ``seen`` inside a teacher token (-1: none)."""
        if seen and self.match != "prefix":
            return -1
        return self.nodes.get(seen, -1)

    def apply(self, probs: Tensor, nodes: Tensor, unplaced: str = "renormalize") -> Tensor:
        """Rows ``[n, Vt]`` of teacher probabilities at nodes ``[n]`` (all >= 0) as
        student probabilities ``[n, width]``, not yet renormalised; with ``unplaced =
        "spread"`` a boundary row's unplaced mass is spread over :attr:`orphans`."""
        out = self._moved(probs, nodes)
        if unplaced == "spread" and len(self.orphans):
            at_root = (nodes == 0).unsqueeze(-1).to(probs.dtype)
            rest = (probs.sum(-1, keepdim=True) - out.sum(-1, keepdim=True)).clamp(min=0) * at_root
            out[:, self.orphans.to(probs.device)] += rest / len(self.orphans)
        return out

    def _moved(self, probs: Tensor, nodes: Tensor) -> Tensor:
        """Each teacher token's probability moved to its student token at its row's node."""
        out = probs.new_zeros(probs.shape[0], self.width)
        for node in nodes.unique().tolist():
            rows = (nodes == node).nonzero().squeeze(1)
            a, b = self.starts[node], self.starts[node + 1]
            t_ids, s_ids = self.teacher_ids[a:b].to(probs.device), self.student_ids[a:b].to(probs.device)
            part = probs.index_select(0, rows).index_select(1, t_ids)
            out.index_copy_(0, rows, out.index_select(0, rows).index_add(1, s_ids, part))
        return out


def _real(spans: Sequence[Span]) -> list[int]:
    """Indices of the tokens that carry text (a non-empty span)."""
    return [i for i, (a, e) in enumerate(spans) if e > a]


def align(student_spans: Sequence[Span], student_ids: Sequence[int], teacher_spans: Sequence[Span],
          projection: Projection) -> list[tuple[int, int]]:
    """``(teacher position, node)`` for every student position, ``(-1, -1)`` where unserved
    (see the module docstring). Spans are those of :meth:`Vocabulary.encode` / ``decode``."""
    t_real = _real(teacher_spans)
    t_ends = [teacher_spans[k][1] for k in t_real]
    s_real = _real(student_spans)
    s_ends = [student_spans[j][1] for j in s_real]
    lead = next((k for k, (a, e) in enumerate(teacher_spans) if e > a), len(teacher_spans))
    out = []
    for i, (_, b) in enumerate(student_spans):
        at = bisect.bisect_right(t_ends, b)  # the first teacher token ending after b
        if at < len(t_real):
            k, c = t_real[at], teacher_spans[t_real[at]][0]
        elif t_real:
            k, c = t_real[-1] + 1, t_ends[-1]
        else:
            k, c = lead, 0
        first = bisect.bisect_right(s_ends, c)  # the first student token ending after c
        seen = s_real[first:bisect.bisect_right(s_real, i)]  # those up to position i
        straddles = bool(seen) and student_spans[seen[0]][0] < c
        node = -1 if k == 0 or straddles else projection.node(tuple(student_ids[j] for j in seen))
        out.append((k - 1, node) if node >= 0 else (-1, -1))
    return out
