"""Building the student and the frozen teacher, and loading checkpoints safely."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcore.config import ModelConfig
from kdcore.data import DataSplits
from kdcore.errors import ConfigError
from kdcore.registry import Registry, accepted_parameters


def resolve_path(path: str, config_source: Path | None) -> Path:
    """A path as given, or relative to the config file's folder if only that exists."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and config_source is not None:
        alt = config_source.parent / p
        if alt.exists():
            return alt
    return p


def load_state_dict(path: Path, section: str) -> dict[str, Any]:
    """A model state dict from a kdcore checkpoint or a bare state dict (weights only)."""
    if not path.exists():
        raise ConfigError(f"{section}.checkpoint: file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-weights content
        raise ConfigError(f"{section}.checkpoint: cannot load {path} with weights_only=True "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"{section}.checkpoint: {path} holds no model state dict")
    return state


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
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{section}.backbone: {mc.backbone!r} did not build a torch.nn.Module")
    if mc.checkpoint is not None:
        path = resolve_path(mc.checkpoint, config_source)
        state = load_state_dict(path, section)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"{section}.checkpoint: {path} does not fit backbone {mc.backbone!r} "
                              f"with these parameters ({first})") from None
    return model
