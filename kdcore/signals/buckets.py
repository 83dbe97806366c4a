"""A teacher known over k kept classes plus one tail bucket, and losses on those buckets.

A stored teacher (:mod:`kdcore.signals.store`) holds, per position, the ids of its k
most likely classes, their log-probabilities and the log of the remaining
mass. The losses then see k + 1 buckets on both sides (docs/signals.md):

- teacher: ``[log p_1, ..., log p_k, log(1 - sum_i p_i)]`` (the tail bucket is
  left out when k is the number of classes: the teacher is then complete);
- student: its logits at the k ids and ``logsumexp`` of its other logits, so
  that ``softmax`` over the buckets is exactly the student's probability of
  each kept class and of the rest;
- target: the bucket of the target class (the tail bucket k when the target is
  not among the kept ids); -100 stays -100.

A sampled teacher (``kdcore capture --sample K``) is K slots: each distinct drawn
id's first slot holds ``log(count / K)``, its repeated slots and the tail
``-inf``. The student's slots at those ``-inf`` ids are ``-inf`` too (no bucket
on either side), so ``KL(buckets)`` is ``sum_i w_i log(w_i / q_i)`` with ``q``
the student's full softmax, whose gradient ``q - w`` has expectation ``q - p``:
unbiased for ``kd`` at T = 1 (docs/signals.md).

Both sides are plain ``[..., k + 1]`` logits, so every logit loss, divergence
and transform applies unchanged. A loss's temperature softens the k + 1
buckets (the tail is one class); with every class kept this equals the online
teacher exactly. A :class:`kdcore.LogitLoss` with ``chunk_size`` on a student
given as ``Outputs(hidden, head)`` projects and reduces chunk by chunk
(:mod:`kdcore.losses.fused`), so the student's full logits never exist.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kdcore.common.errors import ConfigError
from kdcore.losses import LogitLoss
from kdcore.losses.functional import IGNORE_INDEX
from kdcore.losses.fused import fused_kept_sum
from kdcore.losses.outputs import Outputs


def reduce_logits(logits: Tensor, ids: Tensor, full: bool, absent: Tensor | None = None) -> Tensor:
    """Student logits ``[..., C]`` reduced to the buckets of ``ids`` ``[..., k]``: ``[..., k (+ 1)]``;
    ``absent`` ``bool [..., k]``: slots that are no bucket (a sampled teacher's repeats), ``-inf``."""
    kept = logits.gather(-1, ids)
    if absent is not None:
        kept = kept.masked_fill(absent, float("-inf"))
    if full:
        return kept
    rest = torch.logsumexp(logits.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([kept, rest], dim=-1)


def bucket_targets(target: Tensor, ids: Tensor) -> Tensor:
    """Each target's bucket: its position among ``ids``, else ``k`` (the tail); -100 stays -100."""
    match = ids == target.unsqueeze(-1)
    bucket = torch.where(match.any(-1), match.to(torch.uint8).argmax(-1), ids.shape[-1])
    return torch.where(target == IGNORE_INDEX, IGNORE_INDEX, bucket)


class TopKOutputs(Outputs):
    """A teacher's outputs over k kept ids: ``logits`` are the teacher's buckets
    ``[..., k (+ 1)]`` (log-probabilities), ``ids`` the kept class ids ``[..., k]``
    (sorted), ``full`` whether every class is kept (no tail bucket), ``sampled``
    whether they are draws (slots whose ``logp`` is ``-inf`` are then no bucket)."""

    __slots__ = ("ids", "full", "sampled")

    def __init__(self, ids: Tensor, logp: Tensor, log_rest: Tensor | None, *, index: Tensor | None = None,
                 sampled: bool = False):
        buckets = logp if log_rest is None else torch.cat([logp, log_rest.unsqueeze(-1)], dim=-1)
        super().__init__(buckets, index=index)
        self.ids, self.full, self.sampled = ids, log_rest is None, sampled

    def absent(self, buckets: Tensor) -> Tensor | None:
        """The slots of the teacher's ``buckets`` ``[..., k (+ 1)]`` that are no bucket (None: all are)."""
        return buckets[..., :self.ids.shape[-1]].isneginf() if self.sampled else None

    def student(self, student: Outputs) -> Outputs:
        """The student's outputs on the same buckets (its features kept)."""
        return Outputs(reduce_logits(student.logits, self.ids, self.full, self.absent(self.logits)),
                       features=student.features, index=student.index)

    def target(self, target: Tensor | None) -> Tensor | None:
        return None if target is None else bucket_targets(target, self.ids)


def _fused(loss: LogitLoss, student: Outputs, teacher: TopKOutputs, target: Tensor | None) -> Tensor:
    """A per-row logit loss on the buckets, the student projected chunk by chunk.

    The kept ids travel with the teacher's rows (appended as floats, exact below
    2**24 classes) so each chunk reduces its own student logits."""
    buckets = teacher.logits if teacher.logits.dtype == torch.float64 else teacher.logits.float()
    width = buckets.shape[-1]
    packed = torch.cat([buckets, teacher.ids.to(buckets.dtype)], dim=-1)

    def kept_sum(s: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        ids = t[:, width:].long()
        return loss.kept_sum(reduce_logits(s, ids, teacher.full, teacher.absent(t[:, :width])), t[:, :width],
                             None if y is None else bucket_targets(y, ids))

    total, count = fused_kept_sum(kept_sum, loss.chunk_size, (student.hidden, student.head), (packed, None),
                                  target, params=loss.trained_parameters())
    return total / count.to(total.dtype).clamp(min=1)


def check_transforms(loss: Any, path: str) -> None:
    """Refuse a term whose transforms need the teacher's full distribution
    (``needs_full_distribution = True``, e.g. ``logit_std``: z-scoring k + 1
    buckets is not z-scoring the logits) against a stored teacher; ``path`` is
    the term's key path."""
    for i, transform in enumerate(getattr(loss, "transforms", None) or ()):
        if getattr(transform, "needs_full_distribution", False):
            raise ConfigError(f"{path}.transforms[{i}]: {transform!r} needs the teacher's full distribution, "
                              "which a stored top-k teacher lacks (use a teacher with source = \"model\")")


def bucket_loss(loss: Any, student: Outputs, teacher: TopKOutputs, target: Tensor | None, *,
                outputs: bool = False) -> Tensor:
    """``loss`` on the k + 1 buckets; ``outputs``: the loss takes :class:`kdcore.Outputs`."""
    if (isinstance(loss, LogitLoss) and not loss.batch_level and loss.chunk_size is not None
            and student.projectable and not student.has_logits):
        return _fused(loss, student, teacher, target)
    s = teacher.student(student)
    y = teacher.target(target)
    if outputs:
        return loss(s, Outputs(teacher.logits, index=teacher.index), y)
    return loss(s.logits, teacher.logits, y)
