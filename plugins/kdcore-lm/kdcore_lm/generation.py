"""Completions of a batch's prompts, as a training batch (on-policy / sequence-level KD).

Prompts. A row's real tokens are its positions with ``attention_mask == 1``
(all positions without a mask), in order, so left and right padding are
alike. With ``prompt_length = 0`` the prompt is every real token up to and
including the first position ``t0`` whose target is kept (``target[t0] !=
-100``: the last token before the first token that carries loss, e.g. the end
of a ``prompt``/``completion`` record's prompt); a row with no kept target is
all prompt. With ``prompt_length = k > 0`` the prompt is the first ``k`` real
tokens of every row (data without prompts: plain text, ``synthetic_lm``).

Generation. ``max_new_tokens`` tokens are drawn after each prompt (see
:mod:`kdcore_lm.sampling`); a row stops at its first ``eos_token_id``, and
generation stops when every row has (or after ``max_new_tokens`` steps; under DDP / FSDP every rank runs all
``max_new_tokens`` steps, so sharded models' collectives stay in step).
The model runs in eval mode under ``no_grad`` and is put back in the mode it
was in. The ``hf`` backbone decodes incrementally with its key/value cache
(prompts left-padded, positions counted from each prompt's first token);
any other model is re-run on the whole right-padded sequences at every step.

The batch. Row ``i`` becomes its prompt (``p_i`` tokens) followed by its
generated tokens up to and including the first EOS (``k_i`` tokens; all of
them without an EOS), right-padded with ``pad_token_id`` to the longest row;
``attention_mask`` is 1 on those ``p_i + k_i`` positions. The target is
shifted as everywhere in kdcore-lm: ``target[t] = ids[t + 1]`` for ``p_i - 1
<= t < p_i + k_i - 1`` (exactly the generated tokens, the EOS included), and
``-100`` on the prompt, after the first EOS and on the padding, so the loss is
taken on the generated tokens only (Agarwal et al. 2024, "On-Policy
Distillation of Language Models", sec. 3: the student's own outputs scored
token by token against the teacher).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from kdcore.losses.outputs import Outputs
from kdcore_lm.sampling import sample_next

IGNORE_INDEX = -100


def prompt_lengths(inputs: Mapping[str, Tensor], target: Tensor, prompt_length: int = 0) -> tuple[Tensor, Tensor]:
    """The real tokens of each row, left-aligned ``[B, T]`` (the rest 0), and the prompt length ``[B]``."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    n_real = real.sum(-1)
    if bool((n_real == 0).any()):
        raise ValueError("a row of the batch has no real token (attention_mask all 0)")
    order = torch.sort((~real).to(torch.int8), dim=-1, stable=True).indices  # real positions first, in order
    tokens = torch.where(torch.arange(ids.shape[1], device=ids.device) < n_real[:, None],
                         ids.gather(-1, order), 0)
    if prompt_length > 0:
        return tokens, n_real.clamp(max=prompt_length)
    kept = ((target != IGNORE_INDEX) & real).gather(-1, order)
    kept &= torch.arange(ids.shape[1], device=ids.device) < n_real[:, None]
    first = torch.where(kept.any(-1), kept.int().argmax(-1) + 1, n_real)
    return tokens, first


def _logits(out) -> Tensor:
    return out.logits if isinstance(out, Outputs) else out


def _cached_steps(model, prompts: Tensor, lengths: Tensor, steps: int, choose) -> None:
    """Incremental decoding of an ``hf`` backbone: ``choose(logits)`` gets each step's
    next-token logits and returns the tokens to feed, or None to stop."""
    batch, width = prompts.shape
    col = torch.arange(width, device=prompts.device)
    shift = width - lengths  # left padding: prompt i occupies columns shift_i..width-1
    ids = torch.where(col >= shift[:, None], prompts.gather(-1, (col - shift[:, None]).clamp(min=0)), 0)
    mask = (col >= shift[:, None]).long()
    pos = (col - shift[:, None]).clamp(min=0)
    base, cache = model.model.base_model, None
    key = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"  # transformers 5.2x
    for _ in range(steps):
        out = base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{key: cache})
        cache = getattr(out, key)
        token = choose(model.head(out.last_hidden_state[:, -1]))
        if token is None:
            return
        ids, pos = token[:, None], pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)


def _recomputed_steps(model, prompts: Tensor, lengths: Tensor, steps: int, choose) -> None:
    """Any model: the whole right-padded sequences at every step, logits read at each row's end."""
    batch = prompts.shape[0]
    seq = torch.cat([prompts, prompts.new_zeros(batch, steps)], dim=1)
    rows = torch.arange(batch, device=prompts.device)
    ends = lengths.clone()
    for _ in range(steps):
        width = int(ends.max())
        mask = (torch.arange(width, device=seq.device) < ends[:, None]).long()
        logits = _logits(model(input_ids=seq[:, :width], attention_mask=mask))
        token = choose(logits[rows, ends - 1])
        if token is None:
            return
        seq[rows, ends] = token
        ends += 1


def generate(model: nn.Module, prompts: Tensor, lengths: Tensor, *, max_new_tokens: int,
             generator: torch.Generator | None, temperature: float = 1.0, top_p: float = 1.0,
             eos_token_id: int | None = None, pad_token_id: int = 0, stop_early: bool = True) -> Tensor:
    """``[B, N]`` tokens generated after the left-aligned ``prompts`` ``[B, P]`` of ``lengths`` ``[B]``
    (``N <= max_new_tokens``; after a row's first EOS its tokens are ``pad_token_id``). With
    ``stop_early = False`` all ``max_new_tokens`` steps run even once every row has ended (every
    rank then runs the same number of forward passes, as a sharded model's collectives need)."""
    out: list[Tensor] = []
    done = torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)

    def choose(logits: Tensor) -> Tensor | None:
        nonlocal done
        token = sample_next(logits, generator, temperature=temperature, top_p=top_p)
        token = torch.where(done, pad_token_id, token)
        out.append(token)
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
        return None if len(out) == max_new_tokens or (stop_early and bool(done.all())) else token

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            if hasattr(model, "head") and hasattr(getattr(model, "model", None), "base_model"):
                _cached_steps(model, prompts, lengths, max_new_tokens, choose)
            else:
                _recomputed_steps(model, prompts, lengths, max_new_tokens, choose)
    finally:
        model.train(was)
    return torch.stack(out, dim=1)


def completion_batch(prompts: Tensor, lengths: Tensor, generated: Tensor, *, eos_token_id: int | None = None,
                     pad_token_id: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    """The training inputs (``input_ids``, ``attention_mask``) and shifted target of the
    prompts followed by their generated tokens, cut after the first EOS (see the module doc)."""
    batch, steps = generated.shape
    device = generated.device
    if eos_token_id is None:
        k = torch.full((batch,), steps, device=device, dtype=torch.long)
    else:
        is_eos = generated == eos_token_id
        k = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, steps)
    width = int((lengths + k).max())
    col = torch.arange(width, device=device)
    in_prompt = col < lengths[:, None]
    in_gen = (col >= lengths[:, None]) & (col < (lengths + k)[:, None])
    ids = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)
    if prompts.shape[1] < width:
        prompts = nn.functional.pad(prompts, (0, width - prompts.shape[1]))
    ids = torch.where(in_prompt, prompts[:, :width], ids)
    g = generated.gather(-1, (col[None, :] - lengths[:, None]).clamp(0, steps - 1))
    ids = torch.where(in_gen, g, ids)
    target = torch.full_like(ids, IGNORE_INDEX)
    target[:, :-1] = torch.where(in_gen[:, 1:], ids[:, 1:], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": (in_prompt | in_gen).long()}, target
