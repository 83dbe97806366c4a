"""kdcore: plugin-based knowledge distillation for PyTorch.

>>> import kdcore
>>> kdcore.available("loss")          # doctest: +SKIP
>>> loss = kdcore.create("loss", "kd", temperature=4.0)
"""

__version__ = "0.1.0"

from kdcore.api import available, create
from kdcore.errors import ConfigError, PluginError, UnknownComponentError
from kdcore.hookspecs import hookimpl
from kdcore.losses import LogitLoss
from kdcore.outputs import Outputs
from kdcore.plugins import reload_plugins

__all__ = ["__version__", "available", "create", "train", "hookimpl", "ConfigError", "PluginError",
           "UnknownComponentError", "LogitLoss", "Outputs", "reload_plugins"]


def __getattr__(name: str):
    """``kdcore.train`` imports the engine on first use: commands and programs
    that only list or create components do not pay for it."""
    if name == "train":
        from kdcore.engine import train

        return train
    raise AttributeError(f"module 'kdcore' has no attribute {name!r}")
