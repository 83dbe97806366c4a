"""Where a run's teacher outputs come from: the model, a store, or a cache (docs/signals.md).

- :class:`ModelTeacher` (``[teacher] source = "model"``): the frozen teacher runs
  on each batch;
- :class:`~kdcore.engine.teacher_cache.CachedTeacher` (``cache = true``): the
  same, but the outputs of every sample are kept the first time it is seen
  (keyed by sample index) and read back afterwards;
- :class:`StoreTeacher` (``source = "store"``): the top-k teacher of a store
  written by ``kdcore capture`` (:mod:`kdcore.signals.store`), as
  :class:`kdcore.signals.buckets.TopKOutputs`; no teacher model exists.

The store and the cache are keyed by sample index, so both are refused where
the training split's augmentation is random (:func:`kdcore.data.fingerprint.random_views`)
unless ``fixed_view = true`` accepts one view per sample, and where a term taps
the teacher's features or a batch policy replaces the inputs.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

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
from kdcore.engine.teacher_cache import CachedTeacher
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


class StoreTeacher:
    """The teacher of a store (its top k, or draws from it), as
    :class:`kdcore.signals.buckets.TopKOutputs` on the device. A store holds no teacher at
    positions whose target is -100 (the losses ignore them; they read as a placeholder), and
    a batch with a target at a position the store has no record of is refused: the store was
    captured from other targets."""

    def __init__(self, reader: store.StoreReader, device: torch.device, where: str = "teacher.store"):
        self.reader, self.device, self.where = reader, device, where  # where: the store's key path

    def _check_kept(self, batch: Batch, index: Tensor, kept: Tensor) -> None:
        """Refuse a batch with a target where the store has no record (``kept`` False)."""
        missing = (batch.target.cpu() != IGNORE_INDEX) & ~kept
        if bool(missing.any()):
            row, pos = (int(v) for v in missing.reshape(len(index), -1).nonzero()[0])
            raise RunFailure(f"{self.where}: {self.reader.root} holds no teacher at position {pos} of training "
                             f"sample {int(index[row])}, whose target is not -100 (it was captured from other "
                             "targets); capture the store again from this data")

    def __call__(self, batch: Batch, inputs, taps: Sequence[str]) -> TopKOutputs:
        index = batch.index.cpu()
        kept = self.reader.kept(index) if self.reader.manifest.get(store.DROPS) else None
        if kept is not None:
            self._check_kept(batch, index, kept)
        ids, logp, rest = self.reader.read(index, kept)
        nb = self.device.type == "cuda"
        return TopKOutputs(ids.to(self.device, non_blocking=nb), logp.to(self.device, non_blocking=nb),
                           None if rest is None else rest.to(self.device, non_blocking=nb), index=batch.index,
                           sampled=self.reader.layout.sampled)


def _infinite_on_draws(term) -> bool:
    """Whether ``term``'s loss is infinite (or NaN) against a sampled teacher, whose mass off the
    drawn ids is 0 (a reverse KL is): probed on two positions of four classes, with a copy of the
    loss on the CPU (the probe must not shape a lazy parameter, such as ``ctkd``'s instance MLP,
    nor meet parameters on another device). A loss that cannot be probed so (it takes
    :class:`kdcore.Outputs`, or raises) counts as finite."""
    if term.uses_outputs:
        return False
    draws = torch.tensor([[0, 0, 1], [2, 2, 2]])
    teacher = TopKOutputs(draws, draw_weights(draws), torch.full((2,), float("-inf")), sampled=True)
    student = Outputs(torch.tensor([[0.5, -1.0, 0.0, 2.0], [0.0, 1.0, -0.5, 0.3]]))
    try:
        loss = copy.deepcopy(term.loss)
        if isinstance(loss, nn.Module):
            loss = loss.cpu()
        with torch.no_grad():
            value = bucket_loss(loss, student, teacher, torch.tensor([1, 2]))
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


def check_all_rows_stored(reader: store.StoreReader, terms: Sequence, where: str) -> None:
    """Refuse a term over every row (``rows = "all"``) against a store that leaves out the
    positions whose target is -100 (``drops_ignored``): the term would train there on the
    placeholder a read gives for them, not on the teacher. ``where``: the store's key path."""
    if not reader.manifest.get(store.DROPS):
        return
    for term in terms:
        if term.rows == "all":
            raise ConfigError(f"{term.path}.rows: 'all' trains at positions whose target is -100, which {where} "
                              f"{reader.root} does not hold (kdcore capture leaves them out); train with the "
                              "running teacher (source = \"model\") or with rows = \"labelled\"")


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
        users = [t for t in objective.terms if _uses(t, name, config)]
        check_sampled_terms(reader, users, f"{section}.store")
        check_all_rows_stored(reader, users, f"{section}.store")
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
