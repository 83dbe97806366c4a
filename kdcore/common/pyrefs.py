"""User code named in a config: ``python:MODULE:ATTRIBUTE`` components.

``backbone = "python:my_models:Net"`` (or a dataset, loss, ... named the same
way) imports ``my_models`` from the config file's folder first, then from
``sys.path``, and uses its attribute ``Net`` as the factory, called with the
table's other keys, like a registered component. This runs the code the
config names, exactly as ``python -c "import my_models"`` would: a config
file from someone else is code from someone else.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kdcore.common.errors import ConfigError

PREFIX = "python:"


def is_python_ref(name: Any) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def resolve(name: str, search_path: Sequence[str] = ()) -> Callable[..., Any]:
    """The object ``python:module:attribute`` names (attribute may be dotted)."""
    ref = name[len(PREFIX):]
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{name!r}: expected 'python:MODULE:ATTRIBUTE', e.g. 'python:my_models:Net'")
    added = [p for p in search_path if p not in sys.path]
    sys.path[:0] = added
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            where = ", ".join([*search_path, "sys.path"])
            raise ConfigError(f"{name!r}: no module {module_name!r} (looked in {where})") from None
        raise ConfigError(f"{name!r}: importing {module_name!r} failed: {exc}") from None
    except Exception as exc:  # the user's module raised while importing
        raise ConfigError(f"{name!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    finally:
        for p in added:
            sys.path.remove(p)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f" (close matches: {', '.join(close)})" if close else ""
            raise ConfigError(f"{name!r}: module {module_name!r} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{name!r}: {attr!r} is not a class or function")
    return obj
