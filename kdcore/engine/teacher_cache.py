"""The teacher cache (``[teacher] cache = true``, docs/signals.md): a running teacher's
outputs kept per sample the first time the sample is seen (keyed by sample index) and
read back afterwards, on the device up to ``cache_budget_mb`` and in an anonymous
memory-mapped file beside the run otherwise, with a checksum of each sample's inputs
so that the cache never answers for other inputs."""

from __future__ import annotations

import errno
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdcore.common.errors import ConfigError, RunFailure
from kdcore.engine.batches import Batch
from kdcore.losses.outputs import Outputs


def _reserve(file, size: int, directory: Path) -> None:
    """Give the cache's spill ``file`` its ``size`` bytes on the disk before it is memory-mapped:
    a write through the map to a full disk would end the process with SIGBUS, no message and
    no checkpoint. Where the filesystem cannot reserve space (``posix_fallocate`` unsupported)
    the file is written with zeros. A full disk is a :class:`RunFailure` naming the file."""
    try:
        try:
            os.posix_fallocate(file.fileno(), 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            _write_zeros(file.fileno(), size)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        mib = -(-size // 2**20)
        raise RunFailure(f"no space left on the device for the teacher cache file in {directory} ({mib} MiB); "
                         f"free space there, set teacher.cache_budget_mb >= {mib} to keep the cache in the "
                         "run device's memory instead, or set teacher.cache = false") from None


def _write_zeros(fd: int, size: int, chunk: int = 2**20) -> None:
    """Write ``size`` zero bytes at the start of ``fd`` (the filesystem allocates them)."""
    zeros = memoryview(bytes(chunk))
    for offset in range(0, size, chunk):
        os.pwrite(fd, zeros[:min(chunk, size - offset)], offset)


class _Rows:
    """Fixed-shape rows by sample index: a device tensor, or an anonymous memory-mapped file."""

    def __init__(self, n: int, like: Tensor, budget_bytes: int, device: torch.device, spill_dir: Path | None):
        self.shape, self.dtype = tuple(like.shape[1:]), like.dtype
        self.row_bytes = math.prod(self.shape) * like.element_size()
        self.on_device = n * self.row_bytes <= budget_bytes
        self.device = device
        if self.on_device:
            self.data = torch.empty((n, *self.shape), dtype=self.dtype, device=device)
        else:
            if spill_dir is not None:
                spill_dir.mkdir(parents=True, exist_ok=True)
            self._file = tempfile.TemporaryFile(dir=spill_dir, prefix=".kdcore-teacher-cache-")
            try:
                _reserve(self._file, n * self.row_bytes, Path(spill_dir or tempfile.gettempdir()))
            except BaseException:
                self._file.close()
                raise
            self.data = np.memmap(self._file, dtype=np.uint8, mode="r+", shape=(n, self.row_bytes))

    def put(self, index: Tensor, value: Tensor) -> None:
        if self.on_device:
            self.data[index.to(self.device)] = value
        else:
            raw = value.detach().contiguous().cpu().view(torch.uint8).reshape(len(index), -1)
            self.data[index.numpy()] = raw.numpy()

    def get(self, index: Tensor) -> Tensor:
        if self.on_device:
            return self.data[index.to(self.device)]
        raw = torch.from_numpy(np.ascontiguousarray(self.data[index.numpy()]))
        return raw.view(self.dtype).reshape(len(index), *self.shape).to(self.device, non_blocking=True)


def input_checksums(inputs) -> Tensor:
    """One float64 number per sample of ``inputs`` (a tensor or a mapping of tensors): a
    position-weighted sum of its values, which changes when the sample's inputs do."""
    tensors = [inputs[k] for k in sorted(inputs)] if isinstance(inputs, Mapping) else [inputs]
    total = None
    for t in tensors:
        flat = t.detach().reshape(t.shape[0], -1).double()
        weights = torch.arange(flat.shape[1], device=flat.device, dtype=torch.float64).remainder_(251).add_(1)
        part = flat @ weights
        total = part if total is None else total + part
    return total.cpu()


class CachedTeacher:
    """A running teacher (:class:`~kdcore.engine.teacher_source.ModelTeacher`) whose outputs (logits, or hidden states where the teacher
    gives ``Outputs(hidden, head)``) are kept per sample after the first time.

    Each kept sample also keeps :func:`input_checksums` of its inputs; a batch read
    from the cache whose inputs differ from those is refused (the data pipeline
    was random after all), so the cache never answers for other inputs."""

    def __init__(self, model: Callable[[Batch, Any, Sequence[str]], Outputs], n: int, budget_mb: int, device: torch.device,
                 spill_dir: Path | None, section: str = "teacher"):
        self.model, self.n, self.device, self.spill_dir = model, n, device, spill_dir
        self.section = section  # the teacher's key path, for messages
        self.budget = budget_mb * 2**20
        self.rows: _Rows | None = None
        self.head = None
        self.filled = torch.zeros(n, dtype=torch.bool)
        self.sums = torch.zeros(n, dtype=torch.float64)
        self.hits = 0  # batches answered from the cache

    def _check(self, index: Tensor, sums: Tensor) -> None:
        same = torch.isclose(sums, self.sums[index], rtol=1e-9, atol=1e-9)
        if not bool(same.all()):
            i = int(index[~same][0])
            raise ConfigError(f"{self.section}.cache: the inputs of training sample {i} differ from those its "
                              f"teacher outputs were cached for (the data pipeline is random); set "
                              f"{self.section}.cache = false, "
                              "or make the augmentation declare itself (random_views, docs/signals.md)")

    @property
    def on_device(self) -> bool:
        return self.rows is not None and self.rows.on_device

    def __call__(self, batch: Batch, inputs, taps: Sequence[str]) -> Outputs:
        index = batch.index.cpu()
        sums = input_checksums(inputs)
        if self.rows is not None and bool(self.filled[index].all()):
            self._check(index, sums)
            self.hits += 1
            value = self.rows.get(index)
            if self.head is not None:
                return Outputs(hidden=value, head=self.head, index=batch.index)
            return Outputs(value, index=batch.index)
        out = self.model(batch, inputs, taps)
        if out.known is not None:
            raise ConfigError(f"{self.section}.cache: the teacher's outputs hold only some positions (a teacher "
                              "with another tokenizer, backbone cross_tokenizer), which the cache does not keep; "
                              f"set {self.section}.cache = false")
        keep_hidden = out.projectable and not out.has_logits
        value = out.hidden if keep_hidden else out.logits
        if self.rows is None:
            self.rows = _Rows(self.n, value, self.budget, self.device, self.spill_dir)
            self.head = out.head if keep_hidden else None
        self.rows.put(index, value.detach())
        self.filled[index] = True
        self.sums[index] = sums
        return out
