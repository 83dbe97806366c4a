"""A run's data and models: the dataset of ``[data]``, the student and the frozen
teacher(s), each with its checkpoint loaded (:mod:`kdcore.engine.checkpoints`)."""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from kdcore.common.errors import ConfigError
from kdcore.config import Config, ModelConfig, resolve_path
from kdcore.data import DataSplits
from kdcore.engine.checkpoints import check_finite_weights, check_state_fits, load_state_dict
from kdcore.plugins import default_registry
from kdcore.plugins.registry import Registry, accepted_parameters


def build_data(config: Config, registry: Registry) -> DataSplits:
    """The dataset ``[data]`` names, built with its parameters."""
    try:
        return registry.create("dataset", config.data.name, **config.data.params)
    except ConfigError as exc:
        raise exc.with_path("data") from None


def build_backbone(mc: ModelConfig, section: str, data: DataSplits, registry: Registry,
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


def build_teacher(config: Config, data: DataSplits, registry: Registry, name: str | None = None) -> nn.Module:
    """Teacher ``name``'s model (default: the one teacher) with its trained weights,
    frozen, in eval mode (on the CPU)."""
    tables = config.teacher_tables()
    name = next(iter(tables)) if name is None else name
    mc, section = tables[name], config.teacher_path(name)
    teacher = build_backbone(mc, section, data, registry, config.source)
    if mc.checkpoint is None and not getattr(teacher, "pretrained", False):
        raise ConfigError(f"{section}.checkpoint: required (the teacher's trained weights; a backbone "
                          "that loads its own weights sets pretrained = True)")
    return teacher.eval().requires_grad_(False)


def build_model(config: Config, section: str = "student", data: DataSplits | None = None, *,
                registry: Registry | None = None) -> nn.Module:
    """The model of a config's ``[student]``, ``[teacher]`` or ``[teachers.NAME]`` table
    (``section``), with its checkpoint loaded (a teacher frozen and in eval mode), for
    ``data`` (default: the config's ``[data]``, built) and the installed plugins (or ``registry``)."""
    teacher = {config.teacher_path(n): n for n in config.teacher_tables()}.get(section)
    if teacher is None and (section != "student" or config.student is None):
        raise ConfigError(f"{section}: the config has no [{section}] table")
    registry = default_registry() if registry is None else registry
    data = build_data(config, registry) if data is None else data
    if teacher is not None:
        return build_teacher(config, data, registry, teacher)
    return build_backbone(config.student, "student", data, registry, config.source)
