"""Atomic files: a reader sees the old file or the new one, never a part.

Both writers go through a temporary file in the same folder (``.NAME.*.tmp``),
``fsync`` and ``os.replace``; the file's mode follows the umask. A full disk
while writing is a one-line :class:`~kdcore.common.errors.RunFailure` that
says the previous file is intact, and the temporary file is removed; one left
behind by a killed process is found by :func:`remove_temporaries`.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from kdcore.common.errors import RunFailure

#: The names of the temporary files of :func:`atomic_write` and :func:`atomic_torch_save`
#: (``tempfile.mkstemp``'s eight random characters between ``.NAME.`` and ``.tmp``).
TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}


def file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (0644 under umask 022)."""
    try:  # Linux: read it without changing it (os.umask would, for a moment, in every thread)
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def full_disk(exc: BaseException, path: Path, kept: str) -> RunFailure | None:
    """A :class:`RunFailure` for ``exc`` if it (or an error it arose from: torch wraps the
    ``OSError`` of a write in a ``RuntimeError``) says the disk is full, else None.
    ``kept`` says what is left of ``path``, for the message."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return RunFailure(f"{_FULL[exc.errno]} writing {path} ({kept})")
        exc = exc.__cause__ or exc.__context__
    return None


def _what_is_kept(path: Path) -> str:
    return f"the previous {path.name} is intact" if path.exists() else "nothing was written"


def _replace_from_temporary(path: Path, write) -> None:
    """Call ``write(file)`` on a new temporary file beside ``path``, ``fsync`` it and move
    it over ``path``; on any failure the temporary file is removed and ``path`` is
    untouched (a full disk is a :class:`RunFailure`, see :func:`full_disk`)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        failure = full_disk(exc, path, _what_is_kept(path))
        if failure is not None:
            raise failure from None
        raise


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace`` (mode from the umask)."""
    _replace_from_temporary(path, lambda f: f.write(data.encode() if isinstance(data, str) else data))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` via a temporary file and ``os.replace`` (mode from the umask).

    It writes to an open file, not a file name: torch then raises the ``OSError`` of a
    failed write (ENOSPC) instead of an ``enforce fail`` that names no cause.
    """
    _replace_from_temporary(path, lambda f: torch.save(obj, f))


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files that a killed atomic write left in ``directory`` and
    its subdirectories (symbolic links are not followed); returns their paths.
    Call it only while no other process writes there (a run holds its lock)."""
    removed = []
    for root, _dirs, names in os.walk(directory):
        for name in names:
            entry = Path(root) / name
            if TEMPORARY.fullmatch(name) and entry.is_file() and not entry.is_symlink():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed
