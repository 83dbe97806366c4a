"""Module paths that name modules which moved: ``import old.path`` keeps working.

:func:`install` adds one finder to ``sys.meta_path`` for a package's table of
moved modules. Importing an old path gives a small module that looks each name
up in the new homes, in order (PEP 562 ``__getattr__``), so ``from
kdcore.functional import kl_rows`` and ``kdcore.functional.kl_rows`` both work;
the new modules themselves are imported only when the old path is.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, moved: Mapping[str, Sequence[str]]):
        self.moved = dict(moved)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname not in self.moved:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None  # the default: an empty module

    def exec_module(self, module: types.ModuleType) -> None:
        homes = self.moved[module.__name__]
        module.__doc__ = f"Moved: the names of {', '.join(homes)}."

        def __getattr__(name: str) -> Any:
            for home in homes:
                found = importlib.import_module(home)
                if hasattr(found, name):
                    return getattr(found, name)
            raise AttributeError(f"module {module.__name__!r} (moved to {homes[0]}) has no attribute {name!r}")

        def __dir__() -> list[str]:
            return sorted({n for home in homes for n in dir(importlib.import_module(home))})

        module.__getattr__ = __getattr__
        module.__dir__ = __dir__


def install(package: str, moved: Mapping[str, Sequence[str]]) -> None:
    """Serve ``package.OLD`` from the modules ``moved[OLD]`` (once per package)."""
    full = {f"{package}.{old}": tuple(homes) for old, homes in moved.items()}
    if not any(isinstance(f, _MovedModules) and f.moved == full for f in sys.meta_path):
        sys.meta_path.append(_MovedModules(full))
