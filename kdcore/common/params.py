"""Parameter checks for component constructors: each raises ConfigError naming the parameter."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

from kdcore.common.errors import ConfigError


def number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: must be a number, got {value!r}")
    return float(value)


def positive(name: str, value: Any) -> float:
    v = number(name, value)
    if not v > 0:
        raise ConfigError(f"{name}: must be > 0, got {value!r}")
    return v


def non_negative(name: str, value: Any) -> float:
    v = number(name, value)
    if not v >= 0:
        raise ConfigError(f"{name}: must be >= 0, got {value!r}")
    return v


def in_range(name: str, value: Any, low: float, high: float, *, closed_high: bool = False) -> float:
    v = number(name, value)
    ok = low <= v <= high if closed_high else low <= v < high
    if not ok:
        raise ConfigError(f"{name}: must be in [{low}, {high}{']' if closed_high else ')'}, got {value!r}")
    return v


def positive_int(name: str, value: Any, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
    return value


def one_of(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"{name}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def finite(name: str, value: Any) -> None:
    """Refuse ``inf`` and ``nan`` anywhere in ``value``, also inside nested tables and lists,
    naming the key path (``divergence.alpha``): no component can mean them, and
    ``temperature = inf`` would otherwise pass ``> 0`` checks and poison every step."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        if not math.isfinite(value):
            raise ConfigError(f"{name}: must be finite, got {value!r}")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            finite(f"{name}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            finite(f"{name}[{i}]", item)


def physical_memory() -> int | None:
    """This machine's memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def fits_in_memory(name: str, value: Any, nbytes: int) -> None:
    """Refuse a size whose data (``nbytes``, the caller's estimate) exceeds this
    machine's memory, before anything is allocated: a smaller machine would fail
    only after minutes of filling memory, or be killed by the system."""
    total = physical_memory()
    if total is not None and nbytes > total:
        raise ConfigError(f"{name}: {value} needs about {nbytes / 2**30:,.1f} GiB of memory with these "
                          f"parameters, more than this machine's {total / 2**30:,.1f} GiB; lower it")
