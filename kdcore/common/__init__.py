"""The bottom layer: what every part of kdcore uses, itself using nothing of kdcore.

- :mod:`~kdcore.common.errors`: the exceptions (a user's mistake, a broken plugin, a failure while running);
- :mod:`~kdcore.common.params`: checks of component parameters (``params.positive("temperature", t)``);
- :mod:`~kdcore.common.files`: atomic writes (:func:`atomic_write`, :func:`atomic_torch_save`);
- :mod:`~kdcore.common.env`: environment flags; :mod:`~kdcore.common.pyrefs`: ``python:MODULE:ATTRIBUTE`` names.

Layer 0: imports the standard library, torch and numpy only.
"""

from kdcore.common import params
from kdcore.common.errors import (ConfigError, DamagedCheckpoint, DuplicateComponentError, LossTermFailure,
                                  NonFiniteGradient, NonFiniteLoss, PluginError, RunFailure, UnknownComponentError)
from kdcore.common.files import atomic_torch_save, atomic_write

__all__ = ["params", "ConfigError", "UnknownComponentError", "PluginError", "DuplicateComponentError", "RunFailure",
           "DamagedCheckpoint", "NonFiniteLoss", "NonFiniteGradient", "LossTermFailure", "atomic_write", "atomic_torch_save"]
