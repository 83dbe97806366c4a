"""Backbone ``cross_tokenizer``: a teacher with another tokenizer, seen in the student's
positions and vocabulary (docs/lm.md, "Teacher and student with different tokenizers").

It wraps the teacher's own backbone table (``teacher = { backbone = "hf", ... }``) and
the two tokenizers. Its forward takes the student's batch: each row is decoded
with the student's tokenizer, the text tokenised with the teacher's, the teacher
run on that, and its next-token probabilities moved to the student's positions and
vocabulary by :mod:`kdcore_lm.align`. The result is :class:`kdcore.Outputs` with
``log`` of those probabilities as logits (``[B, T, Vs]``; mixed with ``floor``
times the uniform law so no logit is ``-inf``) and ``known``, the positions the
alignment serves: the engine leaves the others out of every term that uses the
teacher (the student's ``ce`` keeps them). Every loss that compares logits of one
vocabulary (``kd``, ``jsd``, ...) then works unchanged; with ``match = "none"``
the logits are the teacher's own (``[B, T, Vt]``, at the aligned positions) for
the vocabulary-free loss ``uld``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kdcore.common.errors import ConfigError
from kdcore.losses.outputs import Outputs
from kdcore_lm.align import MATCHES, UNPLACED, Projection, Vocabulary, align, vocabulary


class CrossTokenizerTeacher(nn.Module):
    """``teacher`` (a backbone over ``teacher_vocab``) answering for the student's batches.

    Its state dict is the wrapped teacher's own, so ``[teacher] checkpoint`` holds the
    teacher's weights as it was trained, with its own tokenizer."""

    def __init__(self, teacher: nn.Module, teacher_vocab: Vocabulary, student_vocab: Vocabulary,
                 match: str = "prefix", floor: float = 1e-6, unplaced: str = "renormalize"):
        super().__init__()
        self.teacher = teacher
        self.teacher_vocab, self.student_vocab = teacher_vocab, student_vocab
        self.projection = Projection(teacher_vocab, student_vocab, match)
        self.floor, self.unplaced = floor, unplaced
        self.pretrained = bool(getattr(teacher, "pretrained", False))
        self.register_state_dict_post_hook(_drop_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> Outputs:
        if position_ids is not None:
            raise ConfigError("teacher.backbone: cross_tokenizer takes one document per row, not packed rows "
                              "(position_ids); set data.packing = false")
        if attention_mask is not None and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise ConfigError("teacher.backbone: cross_tokenizer takes right-padded rows (the attention mask's "
                              "ones, then its zeros); a row here is padded on the left: pad on the right")
        rows = self._rows(input_ids, attention_mask)
        t_ids, t_mask = self._teacher_batch([ids for ids, _ in rows], input_ids.device)
        self._check_length(t_ids.shape[-1])
        out = Outputs.of(self.teacher(input_ids=t_ids, attention_mask=t_mask))
        t_probs = torch.softmax(out.logits.float(), -1)  # [B, Tt, Vt]
        logits = torch.zeros(*input_ids.shape, self.projection.width, device=t_probs.device)
        known = torch.zeros(*input_ids.shape, dtype=torch.bool, device=t_probs.device)
        pairs = [(r, i, j, node) for r, (_, aligned) in enumerate(rows) for i, (j, node) in enumerate(aligned)
                 if node >= 0]
        if pairs:
            b, i, j, nodes = torch.tensor(pairs, device=t_probs.device).unbind(1)
            probs = self.projection.apply(t_probs[b, j], nodes, self.unplaced)
            mass = probs.sum(-1, keepdim=True)
            served = mass.squeeze(-1) > 0
            probs = (1 - self.floor) * probs / mass.clamp(min=1e-30) + self.floor / self.projection.width
            logits[b[served], i[served]] = probs[served].log()
            known[b[served], i[served]] = True
        return Outputs(logits, known=known)

    def _rows(self, input_ids: Tensor, attention_mask: Tensor | None) -> list[tuple[list[int], list]]:
        """Per row: the teacher's ids of its text and the alignment of the student's positions
        (:func:`kdcore_lm.align.align`; unserved throughout where the row does not decode
        back to its ids, and at the padding that ends a row whose ``attention_mask`` has zeros)."""
        out = []
        lengths = attention_mask.sum(-1).tolist() if attention_mask is not None else None
        for r, row in enumerate(input_ids.tolist()):
            n = len(row) if lengths is None else int(lengths[r])
            decoded = self.student_vocab.decode(row[:n])
            if decoded is None:
                out.append(([], [(-1, -1)] * len(row)))
                continue
            text, s_spans = decoded
            t_ids, t_spans = self.teacher_vocab.encode(text)
            out.append((t_ids, align(s_spans, row[:n], t_spans, self.projection) + [(-1, -1)] * (len(row) - n)))
        return out

    def _check_length(self, length: int) -> None:
        """Refuse a row whose text the teacher's tokenizer makes longer than the teacher's
        positions (``max_position_embeddings`` of a transformers config, where it has one)."""
        config = getattr(getattr(self.teacher, "model", None), "config", None)
        limit = getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int) and length > limit:
            raise ConfigError(f"teacher.backbone: a row of this batch is {length} tokens for the teacher's "
                              f"tokenizer, more than its {limit} positions (max_position_embeddings); shorten "
                              "data.length, or give the teacher more positions")

    def _teacher_batch(self, rows: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
        """The teacher's ids ``[B, Tt]`` (right-padded with id 0) and attention mask."""
        width = max(max((len(r) for r in rows), default=0), 1)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[r, :len(row)] = 1
        return ids.to(device), mask.to(device)


def _drop_prefix(module: nn.Module, state: dict, prefix: str, metadata) -> None:
    """State-dict hook: the wrapped teacher's keys without ``teacher.``, as it was saved alone."""
    for key in [k for k in state if k.startswith(prefix + "teacher.")]:
        state[prefix + key[len(prefix) + len("teacher."):]] = state.pop(key)


def _add_prefix(module: nn.Module, state: dict, prefix: str, *args) -> None:
    """Load hook, the inverse of :func:`_drop_prefix`: a saved teacher's keys under ``teacher.``."""
    for key in [k for k in state if k.startswith(prefix) and not k.startswith(prefix + "teacher.")]:
        state[prefix + "teacher." + key[len(prefix):]] = state.pop(key)


def _inner(spec: Any) -> tuple[str, dict[str, Any]]:
    """The wrapped backbone's name and parameters from the ``teacher`` table."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("backbone"), str):
        raise ConfigError("teacher: required: the teacher's own backbone table, e.g. teacher = { backbone = "
                          "\"hf\", path = \"models/teacher\" }")
    spec = dict(spec)
    name = spec.pop("backbone")
    if name == "cross_tokenizer":
        raise ConfigError("teacher.backbone: cross_tokenizer cannot wrap itself")
    return name, spec


def cross_tokenizer(num_classes: int | None = None, *, teacher: Mapping[str, Any] | None = None,
                    teacher_tokenizer: Any = None, student_tokenizer: Any = None, match: str = "prefix",
                    floor: float = 1e-6, unplaced: str = "renormalize") -> CrossTokenizerTeacher:
    """A teacher with another tokenizer (see the module docstring).

    - ``teacher``: the teacher's backbone table (``backbone`` and its parameters; its
      ``num_classes`` is the teacher tokenizer's size);
    - ``teacher_tokenizer``, ``student_tokenizer``: local tokenizer directories, or
      ``{ name = "synthetic_lm", side = ..., vocab_size = ..., split_tokens = ... }``;
    - ``match``: ``"prefix"`` (default), ``"exact"`` or ``"none"`` (:mod:`kdcore_lm.align`);
    - ``floor``: the weight of the uniform law mixed into the projected probabilities;
    - ``unplaced``: ``"renormalize"`` (default) or ``"spread"``: where the mass the mapping
      cannot place goes at a coinciding boundary (:mod:`kdcore_lm.align`).
    """
    from kdcore.plugins import create

    if match not in MATCHES:
        raise ConfigError(f"match: must be one of {', '.join(map(repr, MATCHES))}, got {match!r}")
    if unplaced not in UNPLACED:
        raise ConfigError(f"unplaced: must be one of {', '.join(map(repr, UNPLACED))}, got {unplaced!r}")
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor < 1:
        raise ConfigError(f"floor: must be a number in [0, 1), got {floor!r}")
    name, inner = _inner(teacher)
    t_vocab = vocabulary(teacher_tokenizer, "teacher_tokenizer")
    s_vocab = vocabulary(student_tokenizer, "student_tokenizer")
    if num_classes is not None and match != "none" and num_classes != len(s_vocab):
        raise ConfigError(f"student_tokenizer: has {len(s_vocab)} tokens but the dataset's vocabulary has "
                          f"{num_classes}: name the tokenizer the dataset was tokenised with")
    inner.setdefault("num_classes", len(t_vocab))
    try:
        model = create("backbone", name, **inner)
    except ConfigError as exc:
        raise exc.with_path("teacher") from None
    return CrossTokenizerTeacher(model, t_vocab, s_vocab, match, float(floor), unplaced)
