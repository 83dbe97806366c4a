"""Where a run's teacher outputs come from: the model, a store, or a cache (docs/signals.md).

- :class:`ModelTeacher` (``[teacher] source = "model"``): the frozen teacher runs
  on each batch;
- :class:`CachedTeacher` (``cache = true``): the same, but the outputs of every
  sample are kept the first time it is seen (keyed by sample index) and read
  back afterwards, on the device up to ``cache_budget_mb`` and in an anonymous
  file beside the run otherwise;
- :class:`StoreTeacher` (``source = "store"``): the top-k teacher of a store
  written by ``kdcore capture`` (:mod:`kdcore.signals.store`), as
  :class:`kdcore.signals.buckets.TopKOutputs`; no teacher model exists.

The store and the cache are keyed by sample index, so both are refused where
the training split's augmentation is random (:func:`kdcore.data.fingerprint.random_views`)
unless ``fixed_view = true`` accepts one view per sample, and where a term taps
the teacher's features or a batch policy replaces the inputs.
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kdcore.common.errors import ConfigError, RunFailure
from kdcore.config import Config
from kdcore.config import resolve_path
from kdcore.data import DataSplits
from kdcore.data import fingerprint
from kdcore.engine.batches import Batch
from kdcore.engine.forward import forward
from kdcore.engine.objective import Objective
from kdcore.losses.functional import IGNORE_INDEX
from kdcore.losses.outputs import Outputs
from kdcore.signals import store
from kdcore.signals.buckets import TopKOutputs, bucket_loss, check_transforms
from kdcore.signals.records import draw_weights


def target_shape(split) -> tuple[int, ...]:
    """The per-sample target shape of a split (``()`` for classification, ``(T,)`` at token level)."""
    targets = getattr(split, "targets", None)
    if isinstance(targets, Tensor):
        return tuple(targets.shape[1:])
    sample = split[0]
    return tuple(torch.as_tensor(sample["target"] if isinstance(sample, Mapping) else sample[1]).shape)


def _uses(term, name: str, config: Config) -> bool:
    """Whether ``term`` uses teacher ``name`` (in the one-teacher form: any term that uses a teacher)."""
    return term.uses_teacher and (config.teachers is None or name in term.teachers)


def check_keyed_by_index(config: Config, data: DataSplits, objective: Objective, what: str,
                         name: str | None = None) -> None:
    """Refuse teacher outputs keyed by sample index where they would not be the teacher's
    outputs on the student's inputs (``what``: the key path, ``teacher.source`` or ``teacher.cache``;
    ``name``: the teacher's, default the one teacher)."""
    tables = config.teacher_tables()
    name = next(iter(tables)) if name is None else name
    if getattr(config, "batch_policy", None) is not None:
        raise ConfigError(f"{what}: [batch_policy] replaces each step's inputs, so teacher outputs "
                          "keyed by sample index do not apply (use source = 'model' without cache)")
    for term in objective.terms:
        if _uses(term, name, config) and term.taps("teacher"):
            raise ConfigError(f"{what}: {term.path} taps the teacher's features, which only a running "
                              "teacher has (use source = 'model' without cache)")
    if not tables[name].signals.fixed_view and fingerprint.random_views(data):
        section = config.teacher_path(name)
        raise ConfigError(f"{what}: the training split's augmentation is random (each epoch shows new views "
                          "of a sample), so teacher outputs keyed by sample index would not match the "
                          f"student's inputs; turn the augmentation off, or set {section}.fixed_view = true to "
                          "accept the teacher's outputs on one view per sample")


class ModelTeacher:
    """The teacher model run on each batch (under ``no_grad``)."""

    def __init__(self, teacher: nn.Module, forward: nn.Module):
        self.teacher, self.forward = teacher, forward

    def __call__(self, batch: Batch, inputs, taps: Sequence[str]) -> Outputs:
        return forward(self.forward, inputs, self.teacher, taps, batch.index)


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
    """A :class:`ModelTeacher` whose outputs (logits, or hidden states where the teacher
    gives ``Outputs(hidden, head)``) are kept per sample after the first time.

    Each kept sample also keeps :func:`input_checksums` of its inputs; a batch read
    from the cache whose inputs differ from those is refused (the data pipeline
    was random after all), so the cache never answers for other inputs."""

    def __init__(self, model: ModelTeacher, n: int, budget_mb: int, device: torch.device,
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
            raise ConfigError("teacher.cache: the teacher's outputs hold only some positions (a teacher with "
                              "another tokenizer, backbone cross_tokenizer), which the cache does not keep; "
                              "set teacher.cache = false")
        keep_hidden = out.projectable and not out.has_logits
        value = out.hidden if keep_hidden else out.logits
        if self.rows is None:
            self.rows = _Rows(self.n, value, self.budget, self.device, self.spill_dir)
            self.head = out.head if keep_hidden else None
        self.rows.put(index, value.detach())
        self.filled[index] = True
        self.sums[index] = sums
        return out


class StoreTeacher:
    """The teacher of a store (its top k, or draws from it), as
    :class:`kdcore.signals.buckets.TopKOutputs` on the device. A store holds no teacher at
    positions whose target is -100 (the losses ignore them; they read as a placeholder), and
    a batch with a target at a position the store has no record of is refused: the store was
    captured from other targets."""

    def __init__(self, reader: store.StoreReader, device: torch.device, where: str = "teacher.store"):
        self.reader, self.device, self.where = reader, device, where  # where: the store's key path

    def _check_kept(self, batch: Batch) -> None:
        index = batch.index.cpu()
        missing = (batch.target.cpu() != IGNORE_INDEX) & ~self.reader.kept(index)
        if bool(missing.any()):
            row, pos = (int(v) for v in missing.reshape(len(index), -1).nonzero()[0])
            raise RunFailure(f"{self.where}: {self.reader.root} holds no teacher at position {pos} of training "
                             f"sample {int(index[row])}, whose target is not -100 (it was captured from other "
                             "targets); capture the store again from this data")

    def __call__(self, batch: Batch, inputs, taps: Sequence[str]) -> TopKOutputs:
        if self.reader.manifest.get(store.DROPS):
            self._check_kept(batch)
        ids, logp, rest = self.reader.read(batch.index.cpu())
        nb = self.device.type == "cuda"
        return TopKOutputs(ids.to(self.device, non_blocking=nb), logp.to(self.device, non_blocking=nb),
                           None if rest is None else rest.to(self.device, non_blocking=nb), index=batch.index,
                           sampled=self.reader.layout.sampled)


def _infinite_on_draws(term) -> bool:
    """Whether ``term``'s loss is infinite (or NaN) against a sampled teacher, whose mass off the
    drawn ids is 0 (a reverse KL is): probed on two positions of four classes. A loss that cannot
    be probed so (it takes :class:`kdcore.Outputs`, or raises) counts as finite."""
    if term.uses_outputs:
        return False
    draws = torch.tensor([[0, 0, 1], [2, 2, 2]])
    teacher = TopKOutputs(draws, draw_weights(draws), torch.full((2,), float("-inf")), sampled=True)
    student = Outputs(torch.tensor([[0.5, -1.0, 0.0, 2.0], [0.0, 1.0, -0.5, 0.3]]))
    try:
        with torch.no_grad():
            value = bucket_loss(term.loss, student, teacher, torch.tensor([1, 2]))
    except Exception:  # noqa: BLE001 (the run itself reports what a loss raises)
        return False
    return isinstance(value, Tensor) and not bool(torch.isfinite(value).all())


def check_sampled_terms(reader: store.StoreReader, terms: Sequence, where: str) -> None:
    """Refuse a term whose loss is infinite on a sampled store (:func:`_infinite_on_draws`), and
    warn (one line) about terms whose gradient it does not estimate without bias: only ``kd``
    with the KL divergence at temperature 1 and no transforms is unbiased on draws
    (docs/signals.md); other ``terms`` train on an approximation. ``where``: the store's key path."""
    if not reader.layout.sampled:
        return
    for term in terms:
        if _infinite_on_draws(term):
            raise ConfigError(f"{term.path}: its loss is infinite against {where} {reader.root}, which holds draws "
                              "from the teacher (no mass off the drawn ids, e.g. for a reverse KL); use a top-k "
                              "store (kdcore capture --top-k) or the running teacher")
    biased = [t.path for t in terms if getattr(t.loss, "lean_kd_temperature", lambda: None)() != 1.0]
    if biased:
        warnings.warn(f"{where}: {reader.root} holds draws from the teacher (kdcore capture --sample), whose "
                      f"gradient is unbiased only for kd at temperature 1; {', '.join(biased)} trains on an "
                      "approximation (docs/signals.md)", stacklevel=2)


def run_with(source, forward: nn.Module) -> None:
    """Let a model source (cached or not) run ``forward`` (the compiled teacher) from now on."""
    model = source.model if isinstance(source, CachedTeacher) else source
    if isinstance(model, ModelTeacher):
        model.forward = forward


def open_store(config: Config, data: DataSplits, where: str | None = None,
               name: str | None = None) -> store.StoreReader:
    """The store ``[teacher] store`` (or teacher ``name``'s) names, checked against this
    run's data and teacher (their fingerprints first, then the store's manifest)."""
    tables = config.teacher_tables()
    name = next(iter(tables)) if name is None else name
    tc, section = tables[name], config.teacher_path(name)
    where = f"{section}.store" if where is None else where
    identity = None
    if tc.backbone is not None:
        ckpt = None if tc.checkpoint is None else resolve_path(tc.checkpoint, config.source)
        if ckpt is not None and not ckpt.exists():
            raise ConfigError(f"{section}.checkpoint: file not found: {ckpt}")
        identity = fingerprint.teacher_identity(tc.backbone, tc.params, ckpt)
    data_print = fingerprint.split_fingerprint(data.train)
    root = resolve_path(tc.signals.store, config.source)
    reader = store.StoreReader.open(root, where)
    store.check_store(reader.manifest, root, fingerprint=data_print, num_classes=data.num_classes,
                      target_shape=target_shape(data.train), n=len(data.train), teacher=identity, where=where)
    return reader


def build(config: Config, data: DataSplits, objective: Objective, teacher: nn.Module | None,
          forward: nn.Module | None, device: torch.device, out: Path | None, name: str | None = None):
    """The run's teacher source (None without a teacher), or teacher ``name``'s (each
    teacher of ``[teachers.NAME]`` has its own ``source``, ``store`` and ``cache``)."""
    tables = config.teacher_tables()
    if not tables:
        return None
    name = next(iter(tables)) if name is None else name
    tc, section = tables[name], config.teacher_path(name)
    if tc.signals.source == "store":
        check_keyed_by_index(config, data, objective, f"{section}.source", name)
        for term in objective.terms:
            if _uses(term, name, config):
                check_transforms(term.loss, term.path)
        reader = open_store(config, data, name=name)
        check_sampled_terms(reader, [t for t in objective.terms if _uses(t, name, config)], f"{section}.store")
        return StoreTeacher(reader, device, f"{section}.store")
    model = ModelTeacher(teacher, forward)
    if not tc.signals.cache:
        return model
    check_keyed_by_index(config, data, objective, f"{section}.cache", name)
    return CachedTeacher(model, len(data.train), tc.signals.cache_budget_mb, device, out, section)


def build_all(config: Config, data: DataSplits, objective: Objective, teachers: Mapping[str, nn.Module | None],
              device: torch.device, out: Path | None):
    """The run's teacher sources: as :func:`build` for the one-teacher form ``[teacher]``,
    a mapping by name for ``[teachers.NAME]`` (what :class:`kdcore.engine.forward.Forward` takes)."""
    if config.teachers is None:
        teacher = next(iter(teachers.values()), None)
        return build(config, data, objective, teacher, teacher, device, out)
    return {name: build(config, data, objective, model, model, device, out, name)
            for name, model in teachers.items()}
