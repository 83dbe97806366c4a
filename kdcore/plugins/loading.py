"""Plugin discovery and loading (pluggy, entry-point group ``kdcore``).

The built-in plugin always loads. Third-party plugins come from the entry
points of group ``kdcore``; ``KDCORE_PLUGINS`` (comma list of entry-point
names, empty for none) restricts them, and a name in it that no installed
plugin has is a :class:`PluginWarning`. A plugin that fails to import, uses an
unknown hook or raises while registering is reported in
``Registry.failed`` (and as a :class:`PluginWarning`) and skipped;
``KDCORE_STRICT_PLUGINS=1`` makes any such failure fatal (and an unknown name
in ``KDCORE_PLUGINS`` a :class:`kdcore.ConfigError`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as md
import os
import warnings
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

import pluggy

from kdcore.common.env import env_flag
from kdcore.common.errors import ConfigError, DuplicateComponentError, PluginError
from kdcore.common.version import VERSION
from kdcore.plugins import hookspecs
from kdcore.plugins.registry import Component, FailedPlugin, PluginInfo, Registry, is_lazy_target, provide_default

ENTRY_POINT_GROUP = "kdcore"
BUILTIN = "builtin"
#: the built-in plugin's module, imported by name like an entry point's
BUILTIN_MODULE = "kdcore.builtin.plugin"


class PluginWarning(UserWarning):
    """A third-party plugin failed to load and was skipped."""


def _allow_list(env: Mapping[str, str]) -> set[str] | None:
    raw = env.get("KDCORE_PLUGINS")
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def _check_allow_list(allow: set[str] | None, entry_points: list[md.EntryPoint], strict: bool) -> None:
    """Warn (or, when strict, fail) about ``KDCORE_PLUGINS`` names that no installed plugin has."""
    installed = {ep.name for ep in entry_points} | {BUILTIN}
    unknown = sorted((allow or set()) - installed)
    if not unknown:
        return
    message = (f"KDCORE_PLUGINS: no installed plugin is named {', '.join(map(repr, unknown))} "
               f"(installed: {', '.join(sorted(installed - {BUILTIN})) or 'none'})")
    if strict:
        raise ConfigError(message)
    warnings.warn(f"kdcore: {message}", PluginWarning, stacklevel=3)


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("kdcore")
    pm.add_hookspecs(hookspecs)
    return pm


def _unknown_hooks(module: ModuleType) -> list[str]:
    """Names of functions marked as kdcore hooks that no hookspec declares."""
    known = {n for n in dir(hookspecs) if n.startswith("register_")}
    return sorted(
        name for name in dir(module)
        if getattr(getattr(module, name, None), "kdcore_impl", None) is not None and name not in known
    )


def _collect(pm: pluggy.PluginManager, plugin: Any, name: str, dist: str | None,
             version: str | None) -> list[Component]:
    """Call the plugin's registration hooks with a register bound to it."""
    found: list[Component] = []
    for hook_name, kind in hookspecs.KIND_OF_HOOK.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin is not plugin:
                continue

            def register(cname: str, factory: Any, *, _kind: str = kind) -> None:
                if not isinstance(cname, str) or not cname:
                    raise PluginError(f"plugin {name!r} registered a {_kind} with an invalid name {cname!r}")
                if not callable(factory) and not is_lazy_target(factory):
                    raise PluginError(f"plugin {name!r} registered {_kind} {cname!r} with a factory that is "
                                      f"neither callable nor a lazy 'module:attribute' string: {factory!r}")
                found.append(Component(_kind, cname, factory, name, dist, version))

            impl.function(register=register)
    return found


def _merge(table: dict[str, dict[str, Component]], comps: Iterable[Component]) -> None:
    """Add ``comps`` to ``table`` atomically, rejecting names taken by another plugin."""
    comps = list(comps)
    seen: dict[tuple[str, str], Component] = {}
    for c in comps:
        prior = table.get(c.kind, {}).get(c.name) or seen.get((c.kind, c.name))
        if prior is not None:
            raise DuplicateComponentError(
                f"{c.kind} {c.name!r} is registered by both plugin {prior.plugin!r} and plugin {c.plugin!r}"
            )
        seen[(c.kind, c.name)] = c
    for c in comps:
        table.setdefault(c.kind, {})[c.name] = c


def load_registry(env: Mapping[str, str] | None = None,
                  entry_points: Iterable[md.EntryPoint] | None = None,
                  extra_plugins: Iterable[tuple[str, Any]] = ()) -> Registry:
    """Build a :class:`Registry` from the built-in plugin and installed plugins.

    ``env`` defaults to ``os.environ``; ``entry_points`` to those of group
    ``kdcore``; ``extra_plugins`` are ``(name, module)`` pairs registered after
    them (handy in tests and notebooks).
    """
    env = os.environ if env is None else env
    allow, strict = _allow_list(env), env_flag("KDCORE_STRICT_PLUGINS", env)
    entry_points = list(md.entry_points(group=ENTRY_POINT_GROUP) if entry_points is None else entry_points)
    _check_allow_list(allow, entry_points, strict)

    pm = new_plugin_manager()
    table: dict[str, dict[str, Component]] = {}
    infos: list[PluginInfo] = []
    failed: list[FailedPlugin] = []

    def add(name: str, plugin: Any, dist: str | None, version: str | None) -> None:
        try:
            unknown = _unknown_hooks(plugin) if isinstance(plugin, ModuleType) else []
            if unknown:
                raise PluginError(f"unknown hook(s) {', '.join(unknown)}")
            pm.register(plugin, name=name)
            comps = _collect(pm, plugin, name, dist, version)
            _merge(table, comps)
        except Exception as exc:  # a broken plugin is reported, not fatal
            if pm.is_registered(plugin):
                pm.unregister(plugin)
            reason = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
            if strict or name == BUILTIN:
                error = type(exc) if isinstance(exc, PluginError) else PluginError
                raise error(f"plugin {name!r} failed to load: {reason}") from exc
            failed.append(FailedPlugin(name, reason, dist, version))
            warnings.warn(f"kdcore: plugin {name!r} failed to load: {reason}", PluginWarning, stacklevel=3)
            return
        infos.append(PluginInfo(name, dist, version, tuple(comps)))

    add(BUILTIN, importlib.import_module(BUILTIN_MODULE), "kdcore", VERSION)
    for ep in sorted(entry_points, key=lambda e: e.name):
        if allow is not None and ep.name not in allow:
            continue
        dist = getattr(ep, "dist", None)
        dname, dver = (dist.metadata["Name"], dist.version) if dist is not None else (None, None)
        try:
            module = ep.load()
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if strict:
                raise PluginError(f"plugin {ep.name!r} failed to load: {reason}") from exc
            failed.append(FailedPlugin(ep.name, reason, dname, dver))
            warnings.warn(f"kdcore: plugin {ep.name!r} failed to load: {reason}", PluginWarning, stacklevel=2)
            continue
        add(ep.name, module, dname, dver)
    for name, module in extra_plugins:
        add(name, module, None, None)
    return Registry(table, tuple(infos), tuple(failed), pm)


@functools.cache
def default_registry() -> Registry:
    """The registry of the installed plugins, built on first use."""
    return load_registry()


provide_default(default_registry)


def reload_plugins() -> Registry:
    """Forget the cached registry (after installing a plugin or changing the env)."""
    default_registry.cache_clear()
    return default_registry()


def available(kind: str) -> list[str]:
    """Sorted names registered for ``kind`` (loss, divergence, transform,
    scheduler, backbone, dataset) in the default registry."""
    return default_registry().available(kind)


def create(kind: str, name: str, **params: Any) -> Any:
    """Build the component ``name`` of ``kind`` from the default registry with keyword ``params``."""
    return default_registry().create(kind, name, **params)
