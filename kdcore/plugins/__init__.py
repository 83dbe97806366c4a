"""The plugin system: hook specifications, the registry, plugin loading.

- :mod:`~kdcore.plugins.hookspecs`: the hooks a plugin implements (``register_losses(register)``, ...);
- :mod:`~kdcore.plugins.registry`: :class:`Registry` (``available``, ``create``, parameter checks),
  :func:`build`, through which components build the components they name (keeping the config's key
  path in errors), and :func:`~kdcore.plugins.registry.current_registry`, the registry it builds from;
- :mod:`~kdcore.plugins.loading`: discovery through the entry-point group ``kdcore`` and the built-in
  plugin, :func:`default_registry`, :func:`available` and :func:`create`.

Layer 1: imports :mod:`kdcore.common` only. Plugins, the built-in one included, are imported by
module name when the registry loads, never by an import statement here.
"""

from kdcore.plugins.hookspecs import KINDS, hookimpl
from kdcore.plugins.loading import (BUILTIN, ENTRY_POINT_GROUP, PluginWarning, available, create, default_registry,
                                    load_registry, reload_plugins)
from kdcore.plugins.registry import Registry, Spec, build

__all__ = ["KINDS", "hookimpl", "Registry", "Spec", "build", "BUILTIN", "ENTRY_POINT_GROUP", "PluginWarning", "available", "create",
           "default_registry", "load_registry", "reload_plugins"]
