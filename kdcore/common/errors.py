"""Exceptions raised by kdcore.

They separate a user's mistake (``ConfigError`` and its subclass ``UnknownComponentError``:
the CLI prints one line and exits 2) from a broken plugin (``PluginError``)
and from a failure while running that its message fully explains
(``RunFailure``: one line, exit 1).
"""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """An unknown or invalid parameter or configuration key.

    The message starts with the key path or parameter name it concerns,
    e.g. ``loss[1].temperature: must be > 0``.
    """

    #: whether the message starts with a key path (False: it names a component,
    #: ``loss 'kd': ...``, and :meth:`with_path` puts the path in front with ``": "``)
    keyed = True

    def with_path(self, path: str) -> "ConfigError":
        """The same error with ``path`` prefixed to its key path."""
        msg = str(self)
        if not path:
            return ConfigError(msg) if self.keyed else ConfigError.unkeyed(msg)
        return ConfigError(join_path(path, msg) if self.keyed else f"{path}: {msg}")

    @classmethod
    def unkeyed(cls, message: str) -> "ConfigError":
        """An error whose message names a component instead of starting with a key path."""
        error = cls(message)
        error.keyed = False
        return error


def join_path(path: str, rest: str) -> str:
    """``path`` followed by the key path ``rest`` (``loss[1]`` + ``inner`` is ``loss[1].inner``,
    + ``[0]`` is ``loss[1][0]``); either may be empty."""
    if not path or not rest:
        return path or rest
    return f"{path}{'' if rest.startswith(('[', '.')) else '.'}{rest}"


class UnknownComponentError(ConfigError, LookupError):
    """A component name that no plugin registered for that kind: a :class:`LookupError`,
    and a :class:`ConfigError` too, so code that adds key paths to configuration errors
    adds them to this one (the CLI exits 2 with its one line either way).

    ``path`` is the config key that named it (``loss[1].inner``), empty for a
    name given to :func:`kdcore.create` directly; the message starts with it."""

    def __init__(self, kind: str, name: str, available: list[str], path: str = ""):
        close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        listing = ", ".join(available) if available else "none registered"
        where = f"{path}: " if path else ""
        super().__init__(f"{where}unknown {kind} {name!r}{hint} (available: {listing})")
        self.kind, self.name, self.close_matches, self.available, self.path = kind, name, close, available, path

    def __str__(self) -> str:  # LookupError would quote the message
        return self.args[0]

    def with_path(self, path: str) -> "UnknownComponentError":
        """The same error with ``path`` prefixed to its key path."""
        return UnknownComponentError(self.kind, self.name, self.available, join_path(path, self.path))

    def __reduce__(self):  # pickled (e.g. from a worker process) with its own arguments
        return type(self), (self.kind, self.name, self.available, self.path)


class PluginError(RuntimeError):
    """A plugin that cannot be loaded or registers something invalid."""


class DuplicateComponentError(PluginError):
    """Two plugins registered the same name for one kind."""


class RunFailure(RuntimeError):
    """A failure while running that one line explains (the CLI exits 1, no traceback hint)."""


class DamagedCheckpoint(RunFailure):
    """A checkpoint file that cannot be read: empty, truncated, not a kdcore checkpoint."""


class NonFiniteLoss(RunFailure):
    """A training step produced a non-finite loss (exit 1; the last finite checkpoint is kept)."""

    def __init__(self, step: int, term: str, value: float):
        super().__init__(f"step {step}: loss term {term!r} is {value} (non-finite); the run stopped and "
                         "kept its last finite checkpoint (lower optim.lr, or set optim.clip_grad_norm)")
        self.step, self.term, self.value = step, term, value


class NonFiniteGradient(RunFailure):
    """A training step whose losses were finite produced a non-finite gradient
    (exit 1; the last finite checkpoint is kept, as for :class:`NonFiniteLoss`)."""

    def __init__(self, step: int, where: str, value: float):
        super().__init__(f"step {step}: the gradient of {where} is not finite ({value}) while every loss "
                         "was finite; the run stopped and kept its last finite checkpoint (lower optim.lr, or "
                         "look for a loss whose gradient is not finite at that value)")
        self.step, self.where, self.value = step, where, value


class LossTermFailure(RunFailure):
    """A loss term that raised, or returned something other than a 0-dim tensor
    (exit 1): one line naming the step where known, the term's id and its key path."""

    def __init__(self, term: str, path: str, problem: str, step: int | None = None):
        where = f"step {step}: " if step is not None else ""
        super().__init__(f"{where}loss term {term!r} ({path}) {problem}")
        self.term, self.problem, self.step = term, problem, step
