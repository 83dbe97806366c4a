"""kdcore's environment variables, read strictly.

``KDCORE_DEBUG`` and ``KDCORE_STRICT_PLUGINS`` are flags: ``1``/``0``,
``true``/``false`` or ``yes``/``no`` (any case); empty or unset means off.
Any other value is a :class:`kdcore.ConfigError` naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from kdcore.common.errors import ConfigError

_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"0", "false", "no", ""})


def env_flag(name: str, env: Mapping[str, str] | None = None) -> bool:
    """The boolean value of the flag variable ``name`` (off when unset or empty)."""
    raw = (os.environ if env is None else env).get(name, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}: must be 1/0, true/false or yes/no (or empty), got {raw!r}")
