"""Batch policy ``on_policy``: on-policy and sequence-level distillation for language models.

At every optimizer step, with probability ``lambda_t`` the student generates
the completions of the batch's prompts and the step trains on them (on-policy
distillation, Agarwal et al. 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", Algorithm 1: the student's
own sequences, scored token by token against the teacher by the run's loss
terms). Otherwise, with ``seq_kd = true`` the teacher generates them
(sequence-level KD, Kim & Rush 2016, "Sequence-Level Knowledge
Distillation", sec. 3.2: training on the teacher's outputs), else the step
trains on the dataset's batch unchanged.

``lambda_t = lmbda * schedule(progress)`` (``lmbda`` alone without a
schedule; spelled ``lmbda`` because ``lambda`` is a Python keyword), any
registered time schedule, and must lie in [0, 1]. The coin of a step and the
tokens drawn come from generators seeded by ``run.seed`` and the step number
(:meth:`kdcore.losses.policy.StepContext.generator`), so runs are deterministic and
``--resume`` is exact. Prompts, generation, EOS and the masks of the new batch
are described in :mod:`kdcore_lm.generation`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kdcore.common.errors import ConfigError
from kdcore.losses import build
from kdcore.losses.policy import DECIDE, SAMPLE, BatchPolicy, StepContext
from kdcore.losses.schedule import Progress
from kdcore_lm.generation import completion_batch, generate, prompt_lengths

INPUT_KEYS = frozenset({"input_ids", "attention_mask"})


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}: must be an integer >= {low}, got {value!r}")
    return value


def _number(name: str, value: Any, ok, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
        raise ConfigError(f"{name}: must be {what}, got {value!r}")
    return float(value)


class OnPolicy(BatchPolicy):
    """``[batch_policy] name = "on_policy"``: see the module doc.

    - ``lmbda``: probability that the student generates a step's completions;
    - ``seq_kd``: otherwise the teacher generates them (else the data's batch);
    - ``schedule``: a registered time schedule multiplying ``lmbda``;
    - ``temperature`` (0: greedy), ``top_p``: sampling (:mod:`kdcore_lm.sampling`);
    - ``max_new_tokens``: tokens generated at most per prompt;
    - ``prompt_length``: 0: prompts end at the first kept target; k > 0: the first k tokens;
    - ``eos_token_id``: generation of a row stops at it (none: after ``max_new_tokens``);
    - ``pad_token_id``: the filler of the new batch's padding (masked, never a target).
    """

    def __init__(self, *, lmbda: float = 0.5, seq_kd: bool = False, schedule: Any = None,
                 temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 32,
                 prompt_length: int = 0, eos_token_id: int | None = None, pad_token_id: int = 0):
        self.lmbda = _number("lmbda", lmbda, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
        if not isinstance(seq_kd, bool):
            raise ConfigError(f"seq_kd: must be true or false, got {seq_kd!r}")
        self.seq_kd = seq_kd
        self.temperature = _number("temperature", temperature, lambda v: 0.0 <= v < float("inf"),
                                   "a finite number >= 0 (0: greedy)")
        self.top_p = _number("top_p", top_p, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
        self.max_new_tokens = _int("max_new_tokens", max_new_tokens, 1)
        self.prompt_length = _int("prompt_length", prompt_length, 0)
        self.eos_token_id = None if eos_token_id is None else _int("eos_token_id", eos_token_id, 0)
        self.pad_token_id = _int("pad_token_id", pad_token_id, 0)
        self.schedule = None
        if schedule is not None:
            self.schedule = build("scheduler", schedule, "schedule")
            if not callable(self.schedule):
                raise ConfigError(f"schedule: {schedule!r} is not a time schedule")

    def fraction(self, progress: Progress) -> float:
        """``lambda_t`` at ``progress`` (a :class:`kdcore.ConfigError` outside [0, 1])."""
        lam = self.lmbda if self.schedule is None else self.lmbda * float(self.schedule(progress))
        if not 0.0 <= lam <= 1.0:
            raise ConfigError(f"batch_policy.schedule: lmbda * schedule is {lam!r} at step {progress.step}, "
                              "outside [0, 1]")
        return lam

    def source(self, context: StepContext) -> str:
        """Who makes this step's completions: ``"student"``, ``"teacher"`` or ``"data"``."""
        lam = self.fraction(context.progress)
        u = float(torch.rand((), generator=context.generator(DECIDE), device=context.device))
        if u < lam:
            return "student"
        return "teacher" if self.seq_kd else "data"

    def __call__(self, batch, context: StepContext):
        who = self.source(context)
        if who == "data":
            return batch
        model = context.student if who == "student" else context.teacher
        if model is None:
            raise ConfigError("batch_policy.seq_kd: the teacher generates, but the run has no teacher model "
                              "(add a [teacher] table)")
        inputs = batch.inputs
        if not isinstance(inputs, Mapping) or "input_ids" not in inputs or not set(inputs) <= INPUT_KEYS:
            got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise ConfigError(f"batch_policy: on_policy needs batches of input_ids and attention_mask (one "
                              f"document per row, no packing), got {got}")
        tokens, lengths = prompt_lengths(inputs, batch.target, self.prompt_length)
        prompts = tokens[:, :int(lengths.max())]
        with context.autocast():
            generated = generate(model, prompts, lengths, max_new_tokens=self.max_new_tokens,
                                 generator=context.generator(SAMPLE, per_rank=True), temperature=self.temperature,
                                 top_p=self.top_p, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                                 stop_early=context.world == 1)
        new_inputs, target = completion_batch(prompts, lengths, generated, eos_token_id=self.eos_token_id,
                                              pad_token_id=self.pad_token_id)
        return batch.replace(inputs=new_inputs, target=target)
