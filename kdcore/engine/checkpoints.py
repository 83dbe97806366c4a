"""Checkpoints: what ``last.pt`` holds, how it is restored exactly, and how any
checkpoint file is read safely.

``last.pt`` holds the student, the loss terms' parameters and buffers, the
optimizer, the AMP scaler, the gradient-aware weighting, the random-number
states and the position in the run (epochs done, optimizer steps, batches done
in the current epoch and that epoch's running sums), so ``--resume`` from a
checkpoint written at an epoch end or in the middle of an epoch
(``run.checkpoint_every``) continues to the weights of an uninterrupted run.

Sharded students (``run.strategy = "fsdp"``) are saved as full state dicts
(gathered on every rank, written by rank 0), so a checkpoint loads anywhere:
in one process, under DDP or under FSDP with another world size.

Every checkpoint file is read by :func:`~kdcore.engine.checkpoint_file.read_checkpoint`
(the CRC-32 of every member checked, then ``weights_only=True``); a read names
the file and says in one line what is wrong: a file that cannot be read, or a
``last.pt`` with non-finite weights, is a
:class:`~kdcore.common.errors.DamagedCheckpoint` (exit 1) for the run's own
``last.pt`` and a :class:`~kdcore.common.errors.ConfigError` (exit 2) for a
model checkpoint named in the config; weights that do not fit the configured
model, and loss terms that do not fit a ``last.pt``, are a ``ConfigError``
naming the first mismatching parameters.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcore.common.errors import ConfigError, DamagedCheckpoint
from kdcore.config import Config
from kdcore.engine.checkpoint_file import DamagedFile, read_checkpoint
from kdcore.engine.objective import Objective

VERSION = 2
#: The entries of a kdcore ``last.pt`` that resuming needs.
RESUME_KEYS = ("model", "optimizer", "epoch", "step")
_SHOWN_MISMATCHES = 3
_START_AGAIN = "resume from an earlier copy of last.pt, or start again with --overwrite"


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


def load_state_dict(path: Path, section: str) -> dict[str, Any]:
    """A model state dict from a kdcore checkpoint or a bare state dict (weights only)."""
    if not path.exists():
        raise ConfigError(f"{section}.checkpoint: file not found: {path}")
    try:
        obj = read_checkpoint(path)
    except ValueError as exc:
        fix = "; copy it again or name an intact checkpoint" if isinstance(exc, DamagedFile) else ""
        raise ConfigError(f"{section}.checkpoint: cannot load {path}: {exc}{fix}") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{section}.checkpoint: {path} holds no model state dict")
    return state


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A run's ``last.pt``, checked to be a complete kdcore checkpoint.

    A file that cannot be read (a member failing its CRC-32 check included), that
    is not a kdcore ``last.pt`` (a ``best.pt``, a bare state dict) or whose
    weights are not finite is a :class:`DamagedCheckpoint` naming it.
    """
    try:
        state = read_checkpoint(path)
    except ValueError as exc:
        raise DamagedCheckpoint(f"{path}: damaged checkpoint: {exc}; {_START_AGAIN}") from None
    missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        hint = "; a best.pt holds only the model" if isinstance(state, dict) and "model" in state else ""
        raise DamagedCheckpoint(f"{path}: not a kdcore last.pt (missing {', '.join(map(repr, missing))}){hint}")
    if not all(isinstance(state[k], int) and not isinstance(state[k], bool) and state[k] >= 0
               for k in ("epoch", "step")):
        raise DamagedCheckpoint(f"{path}: damaged checkpoint: 'epoch' and 'step' must be counts, "
                                f"got {state['epoch']!r} and {state['step']!r}")
    for section, whose in (("model", "the student's"), ("losses", "the loss terms'")):
        found = non_finite(state.get(section) or {})
        if found:
            raise DamagedCheckpoint(f"{path}: holds non-finite weights ({found[0]} entries in {whose} "
                                    f"{found[1]!r}); {_START_AGAIN}")
    return state


def state_mismatches(model: nn.Module, state: Mapping[str, Any], noun: str = "model") -> list[str]:
    """The differences between ``model``'s parameters and ``state``, in the model's order
    (``noun``: what the messages call ``model``)."""
    own = model.state_dict()
    out = []
    for key, value in own.items():
        if key not in state:
            out.append(f"{key!r} missing from the file ({noun} {list(value.shape)})")
        elif not isinstance(state[key], torch.Tensor) or state[key].shape != value.shape:
            got = list(state[key].shape) if isinstance(state[key], torch.Tensor) else type(state[key]).__name__
            out.append(f"{key!r} is {got} in the file, {list(value.shape)} in the {noun}")
    out += [f"{key!r} is in the file but not in the {noun}" for key in state if key not in own]
    return out


def check_state_fits(model: nn.Module, state: Mapping[str, Any], where: str, what: str,
                     noun: str = "model") -> None:
    """A :class:`ConfigError` starting with ``where`` and naming the first mismatches, if any."""
    problems = state_mismatches(model, state, noun)
    if problems:
        more = f" (and {len(problems) - _SHOWN_MISMATCHES} more)" if len(problems) > _SHOWN_MISMATCHES else ""
        raise ConfigError(f"{where}: {what}: {'; '.join(problems[:_SHOWN_MISMATCHES])}{more}")


def non_finite(state: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(kind, key)`` of the first floating-point tensor of ``state`` that is not finite,
    ``kind`` being ``"NaN"`` or ``"infinite"``; None when every one is. ``aminmax`` reads a
    tensor once and allocates no mask its size (a NaN makes both ends NaN)."""
    for key, value in state.items() if isinstance(state, Mapping) else ():
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel()):
            continue
        low, high = (value.float() if value.element_size() == 1 else value).aminmax()  # no float8 kernel
        if not (torch.isfinite(low) and torch.isfinite(high)):
            return ("NaN" if torch.isnan(low) or torch.isnan(high) else "infinite"), key
    return None


def check_finite_weights(state: Mapping[str, Any], where: str, path: Path) -> None:
    """A :class:`ConfigError` naming the first floating-point tensor with NaN or infinite entries."""
    found = non_finite(state)
    if found:
        raise ConfigError(f"{where}: {path} holds non-finite weights ({found[0]} entries in {found[1]!r})")


def check_resume(state: Mapping[str, Any], config: Config, model: nn.Module | None = None,
                 objective: Objective | None = None, *, path: Path | str = "checkpoints/last.pt") -> None:
    """Refuse (:class:`ConfigError`) a resume that ``config`` cannot continue.

    ``state`` is the :func:`load_checkpoint` of ``path``. Refused: no epochs
    or steps left to train (which would replace the summary with an empty one),
    another optimizer, a student whose parameters do not fit the checkpoint's,
    and loss terms with parameters or buffers that do not fit its ``losses``
    (a term added, changed or removed since).
    """
    done, epochs = int(state["epoch"]), config.run.epochs
    if epochs <= done:
        raise ConfigError(f"run.epochs: {epochs} leaves nothing to train: {path} has done {done} "
                          f"epoch(s); resume with run.epochs > {done}")
    steps, max_steps = int(state["step"]), config.run.max_steps
    if max_steps and max_steps <= steps:
        raise ConfigError(f"run.max_steps: {max_steps} leaves nothing to train: {path} has done {steps} "
                          f"step(s); resume with run.max_steps > {steps} (or 0)")
    before = _saved_optimizer(state)
    if before is not None and before != config.optim.name:
        raise ConfigError(f"optim.name: {path} was trained with {before!r}, not {config.optim.name!r}; "
                          "a resume keeps the optimizer")
    if model is not None:
        check_state_fits(model, state["model"], "student", f"{path} does not fit this student")
    if objective is not None:
        _check_loss_terms(objective, state.get("losses") or {}, path)


def _check_loss_terms(objective: Objective, saved: Mapping[str, Any], path: Path | str) -> None:
    """A :class:`ConfigError` starting with the key path of the first loss term whose state
    does not fit ``saved`` (``last.pt``'s ``losses``), or naming the saved terms that the
    config no longer has: ``Module.load_state_dict`` would say it in many lines, later."""
    fitted: set[str] = set()
    for key, module in objective.modules.items():
        term = next(t for t in objective.terms if t.loss is module)
        prefix = f"{key}."
        own = {k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)}
        fitted.update(prefix + k for k in own)
        if not own and module.state_dict():
            raise ConfigError(f"{term.path}: loss term {term.id!r} has parameters or buffers that {path} does "
                              "not hold (a term added since); a resume keeps the loss terms: remove it, or "
                              "start again with --overwrite")
        check_state_fits(module, own, term.path, f"{path} does not fit loss term {term.id!r}", "term")
    gone = sorted({k.split(".")[0] for k in saved if k not in fitted})
    if gone:
        raise ConfigError(f"loss: {path} holds the state of loss term(s) {', '.join(map(repr, gone))}, which "
                          "the config no longer has; a resume keeps the loss terms: add them back, or start "
                          "again with --overwrite")


def _saved_optimizer(state: Mapping[str, Any]) -> str | None:
    """The optimizer name in the checkpoint's config, where it can be read."""
    try:
        return tomllib.loads(state.get("config") or "").get("optim", {}).get("name")
    except (tomllib.TOMLDecodeError, AttributeError, TypeError):
        return None
