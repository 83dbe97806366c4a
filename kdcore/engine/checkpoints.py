"""A run's checkpoint: what ``last.pt`` holds and how it is restored exactly.

``last.pt`` holds the student, the loss terms' parameters and buffers, the
optimizer, the AMP scaler, the gradient-aware weighting, the random-number
states and the position in the run (epochs done, optimizer steps, batches done
in the current epoch and that epoch's running sums), so ``--resume`` from a
checkpoint written at an epoch end or in the middle of an epoch
(``run.checkpoint_every``) continues to the weights of an uninterrupted run.

Sharded students (``run.strategy = "fsdp"``) are saved as full state dicts
(gathered on every rank, written by rank 0), so a checkpoint loads anywhere:
in one process, under DDP or under FSDP with another world size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

VERSION = 2


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def model_state(model: nn.Module, sharded: bool) -> dict[str, Any]:
    """The full state dict of ``model`` (a collective on every rank when ``sharded``)."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def load_model_state(model: nn.Module, state: Mapping[str, Any], sharded: bool) -> None:
    if not sharded:
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, dict(state), options=_options())


def optimizer_state(trained: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict[str, Any]:
    """The optimizer's full state; ``trained`` is a module holding every optimised parameter."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(trained, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(trained: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any],
                         sharded: bool) -> None:
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(trained, optimizer, dict(state), options=_options())


def rng_state() -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
