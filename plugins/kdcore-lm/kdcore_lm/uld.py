"""The Universal Logit Distillation loss ``uld`` (Boizard et al. 2024, "Towards
Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs").

Per kept position (target != -100), with ``p = softmax(teacher / T)`` and
``q = softmax(student / T)``: sort both in decreasing order, pad the shorter
vocabulary with zeros and take ``sum |p_sorted - q_sorted|``, the closed form
of the 1-Wasserstein distance with unit costs between distributions whose
supports are matched by rank. The value is the mean over kept positions.

Sorting throws the token identities away, so the teacher and the student may
have vocabularies of different sizes (different tokenizers). That is why
:class:`ULD` is a plain ``nn.Module`` following the logit-loss call
convention ``loss(student_logits, teacher_logits, target)`` and not a
:class:`kdcore.LogitLoss`: the latter requires logits of one shape for both
models. Positions are matched by index: aligning the two sequences is the
data's job.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcore.common import params
from kdcore.losses.functional import IGNORE_INDEX, scaled_logits


class ULD(nn.Module):
    """``uld``: the L1 distance between the rank-sorted teacher and student
    probabilities, averaged over the kept positions.

    Inputs are ``[N, Vs]`` / ``[N, Vt]`` logits with ``[N]`` targets, or
    ``[B, T, Vs]`` / ``[B, T, Vt]`` with ``[B, T]``; ``Vs`` and ``Vt`` may
    differ. Without a target every position is kept. The value lies in
    ``[0, 2]``; it is float32 for float32, bfloat16 and float16 inputs.

    Parameters: ``temperature`` (T, default 1); ``top_k`` (optional): compare
    only the k largest probabilities of each model, as the authors' code does
    to save memory on large vocabularies (the mass below the k-th rank is left
    out, so the value is a lower bound of the full one).
    """

    uses_teacher = True
    #: the labels only select positions (-100 ignored): the loss does not read them
    uses_target = False
    # it takes logits tensors only (the engine gives a plain module logits): kdcore.Outputs do not apply
    testing_skips = {"outputs"}

    def __init__(self, *, temperature: float = 1.0, top_k: int | None = None):
        super().__init__()
        self.temperature = params.positive("temperature", temperature)
        self.top_k = params.positive_int("top_k", top_k, optional=True)

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor | None = None) -> Tensor:
        s, t = _kept_rows(student, teacher, target)
        if s.shape[0] == 0:
            return s.sum() * 0.0  # no kept position: 0, with zero gradients
        return self.rows(s, t).sum() / s.shape[0]

    def rows(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Per-row ULD ``[n]`` of student rows ``[n, Vs]`` and teacher rows ``[n, Vt]``."""
        q = self._ranked(student)
        p = self._ranked(teacher)
        width = max(p.shape[-1], q.shape[-1])
        q = F.pad(q, (0, width - q.shape[-1]))
        p = F.pad(p, (0, width - p.shape[-1]))
        return (p - q).abs().sum(-1)

    def _ranked(self, logits: Tensor) -> Tensor:
        """``softmax(logits / T)`` in decreasing order (its ``top_k`` largest where set),
        in float32 at least so that bfloat16 probabilities keep their ranks' mass."""
        probs = torch.softmax(scaled_logits(logits, self.temperature), dim=-1)
        if self.top_k is not None and self.top_k < probs.shape[-1]:
            return torch.topk(probs, self.top_k, dim=-1, sorted=True).values
        return torch.sort(probs, dim=-1, descending=True).values

    def extra_repr(self) -> str:
        top_k = "" if self.top_k is None else f", top_k={self.top_k}"
        return f"temperature={self.temperature:g}{top_k}"


def _kept_rows(student: Tensor, teacher: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
    """Student rows ``[n, Vs]`` and teacher rows ``[n, Vt]`` at the kept positions.

    The positions (all dims but the last) must agree: ULD compares position i
    of one model with position i of the other, whatever their vocabularies.
    Ignored rows are dropped before the softmax, so they get exactly zero
    gradient even where their logits are all ``-inf``."""
    if teacher is None:
        raise ValueError("uld needs teacher logits")
    if student.dim() < 2:
        raise ValueError(f"uld: student logits must be [N, V] or [B, T, V], got shape {tuple(student.shape)}")
    if tuple(teacher.shape[:-1]) != tuple(student.shape[:-1]):
        raise ValueError(f"uld: teacher logits {tuple(teacher.shape)} and student logits {tuple(student.shape)} "
                         "cover different positions (all dims but the vocabulary must match); "
                         "align the two sequences by position in the data")
    if target is not None and tuple(target.shape) != tuple(student.shape[:-1]):
        raise ValueError(f"uld: target shape {tuple(target.shape)} does not match logits "
                         f"{tuple(student.shape)} (expected {tuple(student.shape[:-1])})")
    s = student.reshape(-1, student.shape[-1])
    t = teacher.reshape(-1, teacher.shape[-1])
    if target is None:
        return s, t
    keep = target.reshape(-1) != IGNORE_INDEX
    return s[keep], t[keep]
