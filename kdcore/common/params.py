"""Parameter checks for component constructors: each raises ConfigError naming the parameter."""

from __future__ import annotations

from collections.abc import Sequence
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
