"""A run's directory: who may write it (:class:`RunDir`: ``--out`` checks, the
lock, no silent overwrite) and what is checked when a run opens it: that it can
be written, that no directory or pipe stands where the run writes a file, and
that no temporary file of a killed write is left."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdcore.common.errors import ConfigError
from kdcore.common.files import file_mode, full_disk, remove_temporaries

#: What a run writes into its directory; a directory holding any of them holds a run.
RUN_FILES = ("config.toml", "metrics.jsonl", "steps.jsonl", "summary.json", "metrics.damaged.jsonl",
             "steps.damaged.jsonl", "checkpoints", "tb")
#: The entries of RUN_FILES that are directories (the others are files).
RUN_DIRS = ("checkpoints", "tb")
#: The files a run writes in ``checkpoints/``.
CHECKPOINTS = ("checkpoints/last.pt", "checkpoints/best.pt")
LOCK_FILE = ".kdcore.lock"


def check_out(out: str | os.PathLike) -> Path:
    """``--out`` as a path, or a :class:`ConfigError` when it is empty or names a file."""
    text = os.fspath(out)
    if not text.strip():
        raise ConfigError(f"--out: must name a directory, got {text!r}")
    if "\0" in text:
        raise ConfigError(f"--out: {text!r} contains a NUL character")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out: {path} exists and is not a directory")
    return path


def holds_run(path: Path) -> list[str]:
    """The names of the run files in ``path`` (empty when it holds no run)."""
    found = []
    for name in RUN_FILES:
        entry = path / name
        if entry.is_dir() and any(entry.iterdir()) or entry.is_file():
            found.append(name)
    return found


def clear_run(path: Path) -> None:
    """Delete the files a run wrote in ``path`` (other files stay)."""
    for name in RUN_FILES:
        entry = path / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()


class RunLock:
    """An exclusive lock on a run directory: ``flock`` on ``.kdcore.lock``, which
    names its holder (pid and host). The kernel drops a dead process's lock, so a
    stale lock file is taken over; one naming a live process on this host that
    is not ours is respected too."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, directory: Path) -> "RunLock":
        path = directory / LOCK_FILE
        while True:
            fd = _open_lock(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise ConfigError(_held_message(path)) from None
            if os.fstat(fd).st_ino != _inode(path):  # released and removed while we waited: retry
                os.close(fd)
                continue
            holder = _read_holder(path)
            if holder and _alive_elsewhere(holder):
                os.close(fd)
                raise ConfigError(_held_message(path))
            lock = cls(path, fd)
            try:
                lock._name_holder()
            except OSError as exc:  # a full disk shows here first: it is the run's first write
                lock.release()
                raise full_disk(exc, path, "nothing was written") or exc
            return lock

    def _name_holder(self) -> None:
        """Write this process's pid and host into the lock file."""
        os.ftruncate(self.fd, 0)
        os.write(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode() + b"\n")
        os.fsync(self.fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self.fd < 0:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = -1


def _open_lock(path: Path) -> int:
    """The lock file's descriptor, created if need be; a directory that cannot be written
    (read-only file system, no permission) is a :class:`ConfigError`."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    except OSError as exc:
        raise ConfigError(f"--out: cannot write {path} ({exc.strerror}); a run needs a directory it may "
                          "write (copy the run to one)") from None


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive_elsewhere(holder: Mapping[str, Any]) -> bool:
    """Whether ``holder`` names a live process on this host other than this one."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _held_message(path: Path) -> str:
    holder = _read_holder(path)
    who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "another process"
    return (f"--out: {path.parent} is in use by another run ({who}); wait for it to finish, "
            f"or remove {path} if no run is using it")


def _kind(mode: int) -> str:
    """What a file of ``mode`` is, in words."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a file" if stat.S_ISREG(mode) else "a device"


def _check_kind(path: Path, directory: bool) -> None:
    """A :class:`ConfigError` when ``path`` exists and is not what the run writes there
    (a directory if ``directory``, else a regular file), before any time is spent."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISDIR(mode) != directory or not (directory or stat.S_ISREG(mode)):
        wanted = "a directory" if directory else "a file"
        raise ConfigError(f"--out: {path} is {_kind(mode)}, where the run writes {wanted}; remove or rename it")


def _check_writable(path: Path) -> None:
    """A :class:`ConfigError` when the run could not write ``path`` or its subdirectories."""
    for directory in (path, *(path / name for name in RUN_DIRS)):
        if directory.is_dir() and not os.access(directory, os.W_OK):
            why = ("it is on a read-only file system" if os.statvfs(directory).f_flag & os.ST_RDONLY
                   else "no permission to write it")
            raise ConfigError(f"--out: cannot write in {directory} ({why}); a run needs a directory it may "
                              "write (copy the run to one)")


class RunDir:
    """A run directory that this process may write: checked, locked, and holding
    no earlier run's results unless ``overwrite`` (or ``resume``) says so.

    Use as a context manager; the lock is released on exit, also on errors and
    interrupts. On ranks other than the main one (``main=False``) only ``--out``
    is checked: the main rank locks and decides.
    """

    def __init__(self, path: Path, lock: RunLock | None):
        self.path, self.lock = path, lock

    @property
    def last(self) -> Path:
        """The checkpoint ``--resume`` continues from."""
        return self.path / "checkpoints" / "last.pt"

    @classmethod
    def open(cls, out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
             main: bool = True) -> "RunDir":
        """Check ``out``, lock it and make it ready for a new run (or a resume).

        A new run into a directory that holds an earlier run's files is refused
        (``--resume`` continues it); ``overwrite`` deletes those files first.
        Found here rather than after an epoch (:class:`ConfigError`): a directory
        that cannot be written, and a directory or pipe where the run writes a
        file. Once the lock is held the temporary files of killed writes are
        removed; nothing else is written but the lock file.
        """
        path = check_out(out)
        if resume and overwrite:
            raise ConfigError("--overwrite: cannot be combined with --resume (which keeps the run)")
        run_dir = cls(path, None)
        if resume and not run_dir.last.is_file():
            raise ConfigError(f"--resume: no checkpoint to resume from at {run_dir.last}")
        if not main:
            return run_dir
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--out: cannot create {path} ({exc.strerror})") from None
        _check_kind(path / LOCK_FILE, directory=False)
        run_dir.lock = RunLock.acquire(path)
        try:
            _check_writable(path)
            remove_temporaries(path)
            found = [] if resume else holds_run(path)
            if found and not overwrite:
                raise ConfigError(f"--out: {path} holds an earlier run ({', '.join(found)}); continue it "
                                  "with --resume, replace it with --overwrite, or choose another --out")
            if found:
                clear_run(path)
            for name in (*RUN_FILES, *CHECKPOINTS):
                _check_kind(path / name, directory=name in RUN_DIRS)
        except BaseException:
            run_dir.close()
            raise
        return run_dir

    def close(self) -> None:
        """Release the lock."""
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
