"""A run's logs: ``metrics.jsonl`` and ``steps.jsonl`` (:class:`JsonLines`, cut back to
the checkpoint on resume, their damaged lines set aside rather than deleted) and the
TensorBoard scalars (:class:`Scalars`)."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdcore.common.files import atomic_write, full_disk


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
    """An append-only JSON-lines file that can be cut back to a step on resume.

    A line that is not a JSON object (half-written by a kill or a full disk, or
    changed on the disk) is damaged: cutting back moves it, byte for byte, to
    :attr:`damaged_path` and warns once, so that nothing a run wrote is lost.
    """

    def __init__(self, path: Path):
        self.path = path

    @property
    def damaged_path(self) -> Path:
        """Where damaged lines go: ``metrics.damaged.jsonl`` beside ``metrics.jsonl``."""
        return self.path.with_name(f"{self.path.stem}.damaged{self.path.suffix}")

    def _read(self) -> tuple[list[tuple[bytes, dict[str, Any]]], list[tuple[int, bytes]]]:
        """``(line, record)`` for every record and ``(line number, line)`` for every
        damaged line; blank lines are neither."""
        records, damaged = [], []
        for number, line in enumerate(self.path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)  # bytes that are not UTF-8 are a ValueError too
            except ValueError:
                record = None
            if isinstance(record, dict):
                records.append((line, record))
            else:
                damaged.append((number, line))
        return records, damaged

    def truncate_after(self, step: int) -> None:
        """Keep only records with ``step <= step`` (after a crash, before resuming);
        damaged lines are moved to :attr:`damaged_path` first."""
        if not self.path.exists():
            return
        records, damaged = self._read()
        if damaged:
            self._set_aside(damaged)
        atomic_write(self.path, b"".join(line + b"\n" for line, record in records if _step_of(record) <= step))

    def _set_aside(self, damaged: list[tuple[int, bytes]]) -> None:
        """Append ``damaged`` to :attr:`damaged_path`, with one warning naming the first line."""
        earlier = self.damaged_path.read_bytes() if self.damaged_path.is_file() else b""
        atomic_write(self.damaged_path, earlier + b"".join(line + b"\n" for _, line in damaged))
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        warnings.warn(f"{self.path}:{damaged[0][0]}: damaged line moved to {self.damaged_path}{more}", stacklevel=3)

    def append(self, record: Mapping[str, Any]) -> None:
        """Add ``record`` as one line; a full disk is a one-line :class:`~kdcore.common.errors.RunFailure`."""
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(dumps_record(record) + "\n")
                f.flush()
        except OSError as exc:
            failure = full_disk(exc, self.path, "its earlier lines are intact")
            if failure is not None:
                raise failure from None
            raise


def _step_of(record: Mapping[str, Any]) -> int | float:
    step = record.get("step", 0)
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else math.inf


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
