"""Checking a config's components against a registry before anything is built: every
named component exists, accepts its parameters and is given the ones it requires
(for the divergences, transforms and schedules a term names by convention; what a
component builds itself is checked when :func:`kdcore.build` builds it, with the
same key paths).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdcore.common.errors import ConfigError, UnknownComponentError, join_path
from kdcore.config.schema import Config
from kdcore.plugins.registry import Registry, check_parameters


def check_components(config: Config, registry: Registry) -> None:
    """Check that every named component exists and accepts its parameters."""
    def check(kind: str, name: str, params: Mapping[str, Any], path: str, name_key: str = "name",
              reserved: tuple[str, ...] = ()) -> None:
        try:
            comp = registry.get(kind, name)
        except UnknownComponentError as exc:
            raise exc.with_path(join_path(path, name_key)) from None
        except ConfigError as exc:  # a "python:MODULE:ATTRIBUTE" that does not resolve
            raise ConfigError.unkeyed(str(exc)).with_path(join_path(path, name_key)) from None
        try:
            check_parameters(comp, {k: v for k, v in params.items() if k not in reserved}, provided=reserved)
        except ConfigError as exc:
            raise exc.with_path(path) from None

    check("dataset", config.data.name, config.data.params, "data")
    models = {config.teacher_path(name): m for name, m in config.teacher_tables().items()}
    for section, m in {**models, "student": config.student}.items():
        if m.backbone is not None:
            check("backbone", m.backbone, m.params, section, "backbone", ("num_classes", "in_features"))
    def nested(kind: str, spec: Any, path: str) -> None:
        if isinstance(spec, str):
            check(kind, spec, {}, path, name_key="")
        elif isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
            check(kind, spec["name"], {k: v for k, v in spec.items() if k != "name"}, path)

    for i, term in enumerate(config.loss):
        check("loss", term.name, term.params, f"loss[{i}]")
        for key, value in term.params.items():  # the components a term names by convention
            if key == "divergence" or key.endswith("_divergence"):
                nested("divergence", value, f"loss[{i}].{key}")
            elif key == "transforms" and isinstance(value, list):
                for j, spec in enumerate(value):
                    nested("transform", spec, f"loss[{i}].transforms[{j}]")
        if isinstance(term.schedule, str):
            check("scheduler", term.schedule, {}, f"loss[{i}].schedule", name_key="")
        elif isinstance(term.schedule, Mapping):
            sched = dict(term.schedule)
            name = sched.pop("name", None)
            if not isinstance(name, str):
                raise ConfigError(f"loss[{i}].schedule.name: required")
            check("scheduler", name, sched, f"loss[{i}].schedule")
    if config.weighting is not None:
        check("scheduler", config.weighting.name, config.weighting.params, "weighting")
    if config.batch_policy is not None:
        check("batch_policy", config.batch_policy.name, config.batch_policy.params, "batch_policy")
