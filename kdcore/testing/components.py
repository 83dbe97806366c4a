"""Running the right check for a registered component: :func:`check_component`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from kdcore.common.errors import ConfigError
from kdcore.plugins import default_registry
from kdcore.plugins.registry import Registry
from kdcore.testing.backbones import check_backbone
from kdcore.testing.datasets import check_dataset
from kdcore.testing.distributions import check_divergence
from kdcore.testing.losses import check_loss
from kdcore.testing.schedules import check_scheduler
from kdcore.testing.transforms import check_transform


#: the kinds that have checks (every registration hook of the contract)
CHECKED_KINDS = ("loss", "divergence", "transform", "scheduler", "backbone", "dataset")


def components(kind: str, plugin: str | None = None, registry: Registry | None = None) -> list[str]:
    """Sorted names of ``kind`` registered by the plugin whose entry-point name is
    ``plugin`` (every plugin when None), in the installed plugins' registry."""
    reg = default_registry() if registry is None else registry
    return [n for n in reg.available(kind) if plugin is None or reg.get(kind, n).plugin == plugin]


def testing_params(kind: str, name: str, registry: Registry | None = None) -> dict[str, Any]:
    """The parameters the checks build component ``name`` with: its factory's
    ``testing_params`` attribute (a dict), else none (the defaults)."""
    reg = default_registry() if registry is None else registry
    return dict(getattr(reg.get(kind, name).factory, "testing_params", None) or {})


def _required(factory: Callable[..., Any], params: dict[str, Any], filled: tuple[str, ...] = ()) -> list[str]:
    """Required keyword parameters of ``factory`` that ``params`` lacks (``filled``: given by the check)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values() if p.default is p.empty and p.name not in params
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in filled]


def check_component(kind: str, name: str, registry: Registry | None = None,
                    skip: Iterable[str] = (), **params: Any) -> None:
    """Build registered component ``name`` of ``kind`` (with ``params``, else its
    ``testing_params``) and run the checks of its kind: :func:`check_loss`,
    :func:`check_divergence`, :func:`check_transform`, :func:`check_scheduler`
    (a time schedule or a gradient-aware weighting), :func:`check_backbone` or
    :func:`check_dataset`. Backbones and datasets are checked through their
    factory, the others on the built object. A component that cannot be
    built with those parameters (a required one missing, or a
    :class:`kdcore.ConfigError` from the factory, e.g. for missing local
    files) raises :class:`kdcore.ConfigError`."""
    if kind not in CHECKED_KINDS:
        raise ValueError(f"kdcore.testing has no checks for kind {kind!r} (kinds: {', '.join(CHECKED_KINDS)})")
    reg = default_registry() if registry is None else registry
    params = params or testing_params(kind, name, reg)
    filled = ("num_classes", "in_features") if kind == "backbone" else ()
    missing = _required(reg.get(kind, name).factory, params, filled)
    if missing:
        raise ConfigError(f"{kind} {name!r} needs the parameter(s) {', '.join(missing)}; "
                          "give them in its testing_params")
    if kind == "backbone":
        check_backbone(reg.get(kind, name).factory, params=params, skip=skip)
    elif kind == "dataset":
        check_dataset(reg.get(kind, name).factory, params=params, skip=skip)
    else:
        obj = reg.create(kind, name, **params)
        {"loss": check_loss, "divergence": check_divergence, "transform": check_transform,
         "scheduler": check_scheduler}[kind](obj, skip=skip)
