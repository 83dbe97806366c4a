"""The loss terms' own state under :class:`kdcore_lm.KDTrainer`: a file beside the model
in every ``checkpoint-N`` directory and in ``save_model``'s output, read back on resume
(``weights_only=True``), and the callback that clears the terms' gradients after each
optimizer step (the Trainer zeroes only the model's)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from kdcore.common import atomic_torch_save
from kdcore.common.errors import ConfigError, DamagedCheckpoint

#: the file, beside the model in each ``checkpoint-N`` directory and in ``save_model``'s, that
#: holds the loss terms' state (``{"losses": Objective.modules.state_dict()}``)
TERMS_FILE = "kdcore_losses.pt"


class ClearTermGradients(TrainerCallback):
    """Clears the loss terms' gradients after each optimizer step: the Trainer zeroes the
    model's only (``model.zero_grad()``), and the terms are not part of the model."""

    def __init__(self, params: Sequence[nn.Parameter]):
        self.params = list(params)

    def on_optimizer_step(self, args, state, control, **kwargs):
        for p in self.params:
            p.grad = None


def parameter_names(modules: nn.Module, params: Sequence[nn.Parameter]) -> list[str]:
    """The names of ``params`` in ``modules`` (e.g. ``kd.transform_modules.0.raw``), for messages."""
    wanted = {id(p) for p in params}
    return [name for name, p in modules.named_parameters() if id(p) in wanted]


def first_names(names: Sequence[str], shown: int = 3) -> str:
    """``names`` for a one-line message: the first ``shown``, then ``...`` where there are more."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def save(modules: nn.Module, directory: str | Path) -> None:
    """Write the terms' state (where they have any) to ``directory``'s :data:`TERMS_FILE`, atomically."""
    state = modules.state_dict()
    if state:
        atomic_torch_save({"losses": state}, Path(directory) / TERMS_FILE)


def load(modules: nn.Module, directory: str | Path, key: str) -> None:
    """Load the terms' state from ``directory``'s :data:`TERMS_FILE` (``weights_only``); a
    missing file where the terms have state, a file of other terms, or a damaged one is a
    one-line error naming the file (``key``: the setting that chose ``directory``)."""
    state = modules.state_dict()
    if not state:
        return
    path = Path(directory) / TERMS_FILE
    if not path.is_file():
        raise ConfigError(f"{key}: {path} is missing; it holds the state of the loss terms "
                          f"({first_names(list(state))}), which KDTrainer writes into every checkpoint; "
                          "resume from a checkpoint that KDTrainer saved with these losses")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reason the file cannot be read is a damaged file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DamagedCheckpoint(f"{path}: cannot be read ({reason}); resume from an earlier checkpoint") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("losses"), dict):
        raise DamagedCheckpoint(f"{path}: not a KDTrainer loss-terms file (no 'losses' mapping); resume from "
                                "an earlier checkpoint")
    _check_fit(key, path, state, saved["losses"])
    modules.load_state_dict(saved["losses"])


def _check_fit(key: str, path: Path, state: Mapping[str, Tensor], saved: Mapping[str, Any]) -> None:
    """A :class:`ConfigError` where the saved terms' state is not that of these terms
    (other keys, or other shapes)."""
    missing, extra = sorted(set(state) - set(saved)), sorted(set(saved) - set(state))
    shapes = sorted(k for k in set(state) & set(saved)
                    if not torch.is_tensor(saved[k]) or saved[k].shape != state[k].shape)
    if missing or extra or shapes:
        found = "; ".join(f"{what}: {first_names(keys)}" for what, keys in
                          (("missing", missing), ("unexpected", extra), ("other shapes", shapes)) if keys)
        raise ConfigError(f"{key}: {path} holds the state of other loss terms ({found}); "
                          "resume with the losses it was saved with")
