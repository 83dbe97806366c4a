"""Batch policies: what replaces a training step's batch before the forward passes.

A batch policy is a registered component (kind ``batch_policy``, hook
``register_batch_policies``, config table ``[batch_policy]``) called once per
optimizer step, ``policy(batch, context) -> batch``, before the batch is split
into micro-batches and before the student's and the teacher's forward passes.
It may return the batch unchanged (an ordinary step) or a new one with the
same number of rows (``batch.replace(inputs=..., target=...)``), e.g. the
completions a model generates for the batch's prompts (on-policy distillation,
Agarwal et al. 2024, "On-Policy Distillation of Language Models", sec. 3).

:class:`StepContext` is what the policy may use. Its random numbers come from
:meth:`StepContext.generator`, seeded by the run's seed and the step number
only, so a policy that draws from it alone keeps runs deterministic and
``--resume`` exact without any saved state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import nn

from kdcore.losses.schedule import Progress

#: distinct generator streams of one step (a policy may use any other integer too)
DECIDE, SAMPLE = 0, 1


def step_seed(seed: int, step: int, stream: int = 0, rank: int = 0) -> int:
    """The seed of ``stream`` at optimizer step ``step`` (steps before it) of a run seeded ``seed``."""
    return (seed * 1_000_003 + step * 15_485_863 + stream * 7_919 + rank * 104_729 + 0xB47C) % (2 ** 63)


@attrs.frozen
class StepContext:
    """What a batch policy sees at one optimizer step."""

    student: nn.Module                 #: the student (not a DDP wrapper), in training mode
    teacher: nn.Module | None          #: the frozen teacher model in eval mode, or None
    progress: Progress                 #: where the run stands (``progress.step``: steps before this one)
    seed: int                          #: ``run.seed``
    device: torch.device               #: where the batch and the models are
    rank: int = 0                      #: this process's rank under DDP / FSDP (0 otherwise)
    world: int = 1                     #: the number of processes
    #: ``with context.autocast():`` runs under the run's ``run.amp`` setting
    autocast: Callable[[], Any] = contextlib.nullcontext

    def generator(self, stream: int = 0, *, per_rank: bool = False) -> torch.Generator:
        """A fresh generator on ``device`` seeded by (seed, step, ``stream``), and by the
        rank where ``per_rank`` (the same draws on every rank otherwise)."""
        g = torch.Generator(device=self.device)
        return g.manual_seed(step_seed(self.seed, self.progress.step, stream, self.rank if per_rank else 0))


class BatchPolicy:
    """Base of batch policies (any callable ``policy(batch, context) -> batch`` will do)."""

    def __call__(self, batch, context: StepContext):
        return batch

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
