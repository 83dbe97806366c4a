"""Feature taps: the outputs of named submodules, captured for one forward pass.

A loss term with ``uses_outputs = True`` names the modules it needs in
``student_taps`` / ``teacher_taps`` (paths from ``model.named_modules()``).
:func:`check_taps` validates them once, when the run is built; :class:`Tapping`
hooks exactly those modules around one forward pass and removes the hooks
afterwards, so the model's code is never changed and a step with no feature
term costs nothing. A tapped tensor is a copy of the module's output, taken in
the hook: the model may overwrite its output in place afterwards (a
``ReLU(inplace=True)`` after a tapped BatchNorm), and the tap keeps the values
the module returned.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from kdcore.common.errors import ConfigError


def tap_paths(value: Any) -> tuple[str, ...]:
    """A term's ``student_taps`` / ``teacher_taps`` as a tuple of paths (one string is one path)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def check_taps(model: nn.Module, paths: Iterable[str], where: str, side: str) -> None:
    """Raise a :class:`ConfigError` naming ``where`` (the term) for paths that are not modules of ``model``."""
    names = dict(model.named_modules())
    for path in paths:
        if not isinstance(path, str) or path not in names or path == "":
            close = difflib.get_close_matches(str(path), [n for n in names if n], n=5, cutoff=0.5)
            hint = f" (close matches: {', '.join(close)})" if close else \
                f" (modules include: {', '.join(list(n for n in names if n)[:8])})"
            raise ConfigError(f"{where}: {side} tap {path!r} is not a module of the {side}{hint}")


def _feature(output: Any) -> Any:
    """A module's output as a feature: a tuple or list gives its first element, and a tensor
    is cloned, so that a later in-place operation of the model cannot change it (the clone
    carries the gradient back to the output as it was)."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        output = output[0]
    return output.clone() if isinstance(output, Tensor) else output


class Tapping:
    """Context manager: while open, ``features[path]`` receives a copy of each tapped module's output."""

    def __init__(self, model: nn.Module, paths: Iterable[str]):
        self.model, self.paths = model, tuple(dict.fromkeys(paths))
        self.features: dict[str, Any] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> dict[str, Any]:
        if self.paths:
            modules = dict(self.model.named_modules())
            for path in self.paths:
                self._handles.append(modules[path].register_forward_hook(self._hook(path)))
        return self.features

    def _hook(self, path: str):
        def store(module, args, output):
            self.features[path] = _feature(output)
        return store

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
