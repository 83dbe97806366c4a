"""kdcore: plugin-based knowledge distillation for PyTorch.

>>> import kdcore
>>> kdcore.available("loss")          # doctest: +SKIP
>>> loss = kdcore.create("loss", "kd", temperature=4.0)
>>> div = kdcore.build("divergence", {"name": "kl"}, "divergence")   # nested: errors keep the key path

The package is layered (docs/architecture.md): :mod:`kdcore.common` at the
bottom, then :mod:`kdcore.plugins`, :mod:`kdcore.losses` and
:mod:`kdcore.data`, :mod:`kdcore.signals`, :mod:`kdcore.config` and
:mod:`kdcore.builtin`, :mod:`kdcore.engine`, and :mod:`kdcore.cli` and
:mod:`kdcore.testing` on top.
"""

from kdcore.common import aliases
from kdcore.common.errors import ConfigError, PluginError, UnknownComponentError
from kdcore.common.version import VERSION as __version__
from kdcore.losses import LogitLoss, Outputs
from kdcore.plugins import available, build, create, hookimpl, reload_plugins

__all__ = ["__version__", "available", "create", "build", "train", "hookimpl", "ConfigError", "PluginError",
           "UnknownComponentError", "LogitLoss", "Outputs", "reload_plugins"]

#: module paths of kdcore 0.1, before the layered packages: each still imports
aliases.install(__name__, {
    "errors": ["kdcore.common.errors"],
    "params": ["kdcore.common.params"],
    "hookspecs": ["kdcore.plugins.hookspecs"],
    "functional": ["kdcore.losses.functional", "kdcore.losses.divergences"],
    "fused": ["kdcore.losses.fused"],
    "outputs": ["kdcore.losses.outputs"],
    "schedule": ["kdcore.losses.schedule"],
    "weighting": ["kdcore.losses.weighting"],
    "policy": ["kdcore.losses.policy"],
    "store": ["kdcore.signals.store"],
    "capture": ["kdcore.engine.capture"],
    "demo": ["kdcore.cli.demo"],
})


def __getattr__(name: str):
    """``kdcore.train`` imports the engine on first use: commands and programs
    that only list or create components do not pay for it."""
    if name == "train":
        from kdcore.engine import train

        return train
    raise AttributeError(f"module 'kdcore' has no attribute {name!r}")
