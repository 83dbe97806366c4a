"""Configuration: a run's TOML file -> :class:`Config` (attrs classes), ``--set``
overrides, validation.

Layer: imports :mod:`kdcore.common` and the registry of :mod:`kdcore.plugins`
(to check component parameters); nothing above.

Every error is a :class:`kdcore.ConfigError` whose message starts with the key
path (``loss[1].temperature: must be > 0``). Tables that name a component
(``[data]``, ``[teacher]`` or ``[teachers.NAME]``, ``[student]``, ``[[loss]]``, ``[weighting]``,
``[batch_policy]``) pass
their other keys to it as parameters; those are checked against the
component's signature by :func:`check_components`, and refused where a number
in them, at any depth, is ``inf`` or ``nan``.

Limits against configs that would exhaust memory or the stack (all exit 2
naming the key path): a config file of at most 16 MiB (counted on the bytes
read, so a FIFO or a device is bounded too), tables and lists
nested at most 32 deep, lists of at most 10,000 entries, integers within
+-(2**31 - 1) (sizes, counts, steps) except seeds (keys named ``seed``),
which are in 0 .. 2**63 - 1.
"""

from kdcore.config.check import check_components
from kdcore.config.load import apply_overrides, load
from kdcore.config.parse import check_limits, dumps, from_dict, resolve_path, resolve_paths, to_dict
from kdcore.config.schema import (MAX_DEPTH, MAX_FILE_BYTES, MAX_INT, MAX_LIST, MAX_SEED, ONE_TEACHER, PATH_KEYS,
                                  PATH_SUFFIXES, SIGNAL_KEYS, ComponentConfig, Config, LossTermConfig, ModelConfig,
                                  OptimConfig, RunConfig, SignalsConfig)

__all__ = ["Config", "RunConfig", "OptimConfig", "ComponentConfig", "SignalsConfig", "ModelConfig",
           "LossTermConfig", "SIGNAL_KEYS", "PATH_KEYS", "PATH_SUFFIXES", "MAX_FILE_BYTES", "MAX_DEPTH", "MAX_LIST",
           "MAX_INT", "MAX_SEED", "load", "apply_overrides", "from_dict", "to_dict", "dumps", "resolve_path",
           "resolve_paths", "check_limits", "check_components", "ONE_TEACHER"]
