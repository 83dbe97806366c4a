"""Building the student and the frozen teacher, and loading checkpoints safely.

Every checkpoint load names the file and says in one line what is wrong: a
file that cannot be read is a :class:`kdcore.errors.DamagedCheckpoint` (exit
1) for the run's own ``last.pt`` and a :class:`kdcore.ConfigError` (exit 2) for
a teacher named in the config; weights that do not fit the configured model
are a :class:`kdcore.ConfigError` naming the first mismatching parameters.
"""

from __future__ import annotations

import math
import pickle
import tomllib
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcore.config import Config, ModelConfig
from kdcore.data import DataSplits
from kdcore.errors import ConfigError, DamagedCheckpoint
from kdcore.registry import Registry, accepted_parameters

#: The entries of a kdcore ``last.pt`` that resuming needs.
RESUME_KEYS = ("model", "optimizer", "epoch", "step")
_SHOWN_MISMATCHES = 3


def resolve_path(path: str, config_source: Path | None) -> Path:
    """A path as given, or relative to the config file's folder if only that exists."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and config_source is not None:
        alt = config_source.parent / p
        if alt.exists():
            return alt
    return p


def _format_problem(path: Path) -> str | None:
    """What is wrong with the file's format, found without unpickling anything (None: looks fine)."""
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK"):  # torch.save's zip format
        try:
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            return f"the file is truncated or damaged ({exc})"
        return None
    if head[:1] == b"\x80":  # the legacy pickle-based format
        return None
    return "not a PyTorch checkpoint (it does not start like one)"


def _why_unreadable(exc: BaseException) -> str:
    """What ``torch.load`` refused, in one line."""
    message = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "weights_only" in message:
        found = [line.strip() for line in message.splitlines() if "Unsupported" in line]
        return "it holds objects other than tensors, refused by weights_only=True" + (
            f" ({found[0].split('. ')[0]})" if found else "")
    first = message.splitlines()[0].split(". ")[0] if message else ""
    return f"the file is truncated or damaged ({type(exc).__name__}{': ' + first if first else ''})"


def read_checkpoint(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ``ValueError`` with the reason on failure."""
    if path.is_dir():
        raise ValueError("it is a directory, not a file")
    problem = _format_problem(path)
    if problem:
        raise ValueError(problem)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, damaged members, non-weights content
        raise ValueError(_why_unreadable(exc)) from None


def load_state_dict(path: Path, section: str) -> dict[str, Any]:
    """A model state dict from a kdcore checkpoint or a bare state dict (weights only)."""
    if not path.exists():
        raise ConfigError(f"{section}.checkpoint: file not found: {path}")
    try:
        obj = read_checkpoint(path)
    except ValueError as exc:
        raise ConfigError(f"{section}.checkpoint: cannot load {path}: {exc}") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{section}.checkpoint: {path} holds no model state dict")
    return state


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A run's ``last.pt``, checked to be a complete kdcore checkpoint.

    A file that cannot be read, or that is not a kdcore ``last.pt`` (a
    ``best.pt``, a bare state dict), is a :class:`DamagedCheckpoint` naming it.
    """
    try:
        state = read_checkpoint(path)
    except ValueError as exc:
        raise DamagedCheckpoint(f"{path}: damaged checkpoint: {exc}") from None
    missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        hint = "; a best.pt holds only the model" if isinstance(state, dict) and "model" in state else ""
        raise DamagedCheckpoint(f"{path}: not a kdcore last.pt (missing {', '.join(map(repr, missing))}){hint}")
    if not all(isinstance(state[k], int) and not isinstance(state[k], bool) and state[k] >= 0
               for k in ("epoch", "step")):
        raise DamagedCheckpoint(f"{path}: damaged checkpoint: 'epoch' and 'step' must be counts, "
                                f"got {state['epoch']!r} and {state['step']!r}")
    return state


def state_mismatches(model: nn.Module, state: Mapping[str, Any]) -> list[str]:
    """The differences between ``model``'s parameters and ``state``, in the model's order."""
    own = model.state_dict()
    out = []
    for key, value in own.items():
        if key not in state:
            out.append(f"{key!r} missing from the file (model {list(value.shape)})")
        elif not isinstance(state[key], torch.Tensor) or state[key].shape != value.shape:
            got = list(state[key].shape) if isinstance(state[key], torch.Tensor) else type(state[key]).__name__
            out.append(f"{key!r} is {got} in the file, {list(value.shape)} in the model")
    out += [f"{key!r} is in the file but not in the model" for key in state if key not in own]
    return out


def check_state_fits(model: nn.Module, state: Mapping[str, Any], where: str, what: str) -> None:
    """A :class:`ConfigError` starting with ``where`` and naming the first mismatches, if any."""
    problems = state_mismatches(model, state)
    if problems:
        more = f" (and {len(problems) - _SHOWN_MISMATCHES} more)" if len(problems) > _SHOWN_MISMATCHES else ""
        raise ConfigError(f"{where}: {what}: {'; '.join(problems[:_SHOWN_MISMATCHES])}{more}")


def check_finite_weights(state: Mapping[str, Any], where: str, path: Path) -> None:
    """A :class:`ConfigError` naming the first floating-point tensor with NaN or infinite entries."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            kind = "NaN" if torch.isnan(value).any() else "infinite"
            raise ConfigError(f"{where}: {path} holds non-finite weights ({kind} entries in {key!r})")


def check_resume(state: Mapping[str, Any], config: Config, model: nn.Module | None = None, *,
                 path: Path | str = "checkpoints/last.pt") -> None:
    """Refuse (:class:`ConfigError`) a resume that ``config`` cannot continue.

    ``state`` is the :func:`load_checkpoint` of ``path``. Refused: no epochs
    or steps left to train (which would replace the summary with an empty one),
    another optimizer, and a student whose parameters do not fit the
    checkpoint's.
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


def _saved_optimizer(state: Mapping[str, Any]) -> str | None:
    """The optimizer name in the checkpoint's config, where it can be read."""
    try:
        return tomllib.loads(state.get("config") or "").get("optim", {}).get("name")
    except (tomllib.TOMLDecodeError, AttributeError, TypeError):
        return None


def build_model(mc: ModelConfig, section: str, data: DataSplits, registry: Registry,
                config_source: Path | None) -> nn.Module:
    """Create ``mc.backbone`` for the dataset's classes (and input size where it takes one)."""
    params = dict(mc.params)
    params.setdefault("num_classes", data.num_classes)
    accepted, open_ended = accepted_parameters(registry.get("backbone", mc.backbone).factory)
    if "in_features" in accepted and "in_features" not in params:
        params["in_features"] = int(math.prod(data.input_shape))
    try:
        model = registry.create("backbone", mc.backbone, **params)
    except ConfigError as exc:
        raise exc.with_path(section) from None
    except (MemoryError, RuntimeError) as exc:  # e.g. layer widths no memory can hold
        if not isinstance(exc, MemoryError) and "alloc" not in str(exc):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{section}: backbone {mc.backbone!r} with these parameters needs more "
                          f"memory than there is ({first})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{section}.backbone: {mc.backbone!r} did not build a torch.nn.Module")
    if mc.checkpoint is not None:
        path = resolve_path(mc.checkpoint, config_source)
        state = load_state_dict(path, section)
        check_state_fits(model, state, f"{section}.checkpoint",
                         f"{path} does not fit backbone {mc.backbone!r} with these parameters")
        check_finite_weights(state, f"{section}.checkpoint", path)
        model.load_state_dict(state)
    return model
