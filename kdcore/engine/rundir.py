"""A run's directory: who may write it (:class:`RunDir`: ``--out`` checks, the
lock, no silent overwrite), atomic file writes, ``metrics.jsonl``, TensorBoard
scalars."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import socket
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any


from kdcore.common.errors import ConfigError
from kdcore.common.files import atomic_write, file_mode

#: What a run writes into its directory; a directory holding any of them holds a run.
RUN_FILES = ("config.toml", "metrics.jsonl", "steps.jsonl", "summary.json", "checkpoints", "tb")
LOCK_FILE = ".kdcore.lock"


def _jsonable(value: Any) -> Any:
    """JSON has no NaN or infinity: NaN becomes null, infinities the strings "inf"/"-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def dumps_record(record: Mapping[str, Any], indent: int | None = None) -> str:
    return json.dumps(_jsonable(record), indent=indent)


class JsonLines:
    """An append-only JSON-lines file that can be cut back to a step on resume."""

    def __init__(self, path: Path):
        self.path = path

    def records(self) -> list[tuple[str, dict[str, Any]]]:
        """``(line, record)`` for every readable line; a damaged line (a half-written
        last line after a kill or a full disk) is skipped with a warning naming it."""
        if not self.path.exists():
            return []
        out = []
        lines = self.path.read_bytes().decode("utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                warnings.warn(f"{self.path}:{number}: skipped a damaged line ({line[:40]!r})", stacklevel=2)
                continue
            out.append((line, record))
        return out

    def truncate_after(self, step: int) -> None:
        """Keep only records with ``step <= step`` (after a crash, before resuming)."""
        if not self.path.exists():
            return
        keep = [line for line, record in self.records() if _step_of(record) <= step]
        atomic_write(self.path, "".join(line + "\n" for line in keep))

    def append(self, record: Mapping[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(dumps_record(record) + "\n")
            f.flush()


def _step_of(record: Mapping[str, Any]) -> int | float:
    step = record.get("step", 0)
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else math.inf


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
            fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
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
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode() + b"\n")
            os.fsync(fd)
            return cls(path, fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self.fd < 0:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = -1


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
        Nothing but the lock file is written here.
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
        run_dir.lock = RunLock.acquire(path)
        try:
            found = [] if resume else holds_run(path)
            if found and not overwrite:
                raise ConfigError(f"--out: {path} holds an earlier run ({', '.join(found)}); continue it "
                                  "with --resume, replace it with --overwrite, or choose another --out")
            if found:
                clear_run(path)
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


class Scalars:
    """TensorBoard scalars under ``tb/`` (rank 0 only)."""

    def __init__(self, logdir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(logdir), purge_step=purge_step)

    def add(self, scalars: Mapping[str, float], step: int) -> None:
        for key, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
