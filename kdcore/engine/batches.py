"""Deterministic, resumable batching, sharded over DDP ranks.

Each epoch's order is a permutation drawn from a generator seeded by
``(seed, epoch)``, so an epoch can be replayed after a resume (also from the
middle: ``skip``) without any saved sampler state. With ``world`` ranks, every
global batch of ``batch_size`` rows is split into equal contiguous shares, one
per rank (the last batch is cut to a multiple of ``world``), so 2 ranks with
half a batch each see exactly the rows of 1 process with the full batch.

A :class:`Batch` carries the model's inputs (a tensor or a mapping of named
tensors), the target, and the dataset indices of its samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import attrs
import torch
from torch import Tensor

from kdcore.data import Inputs, TensorSplit, index_inputs
from kdcore.losses.functional import IGNORE_INDEX


@attrs.frozen
class Batch:
    """One batch: ``inputs`` (tensor or mapping), ``target`` ``[n]`` / ``[n, T]``, ``index`` ``[n]``."""

    inputs: Inputs
    target: Tensor
    index: Tensor

    @classmethod
    def of(cls, inputs: Inputs, target: Tensor, index: Tensor | None = None) -> "Batch":
        """A batch of given tensors (``index`` defaults to ``0..n-1``)."""
        return cls(inputs, target, torch.arange(target.shape[0]) if index is None else index)

    def __len__(self) -> int:
        return self.target.shape[0]

    def kept(self) -> Tensor:
        """The number of positions a loss is averaged over (targets not -100), as a 0-dim float tensor."""
        return (self.target != IGNORE_INDEX).sum(dtype=torch.float32)

    def split(self, parts: int) -> list["Batch"]:
        """``parts`` micro-batches of (nearly) equal size along the first dim (none empty)."""
        parts = min(parts, len(self))
        if parts <= 1:
            return [self]
        cuts = [len(self) * i // parts for i in range(parts + 1)]
        return [Batch(index_inputs(self.inputs, slice(a, b)), self.target[a:b], self.index[a:b])
                for a, b in zip(cuts, cuts[1:])]

    def replace(self, *, inputs: Inputs | None = None, target: Tensor | None = None) -> "Batch":
        """This batch with new ``inputs`` and/or ``target`` (the same rows: ``index`` is kept)."""
        return attrs.evolve(self, inputs=self.inputs if inputs is None else inputs,
                            target=self.target if target is None else target)

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(move(self.inputs, device, non_blocking), self.target.to(device, non_blocking=non_blocking),
                     self.index)


def move(inputs: Inputs, device: torch.device, non_blocking: bool = False) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: v.to(device, non_blocking=non_blocking) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=non_blocking)


def from_collated(sample, index: Tensor) -> Batch:
    """A :class:`Batch` from a DataLoader's ``(inputs, target)`` or mapping with ``"target"``."""
    if isinstance(sample, Mapping):
        if "target" not in sample:
            raise ValueError(f"a structured sample needs a 'target' entry, got keys {sorted(sample)}")
        inputs = {k: v for k, v in sample.items() if k != "target"}
        return Batch(inputs, sample["target"], index)
    x, y = sample
    return Batch(x, y, index)


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + stream) % (2 ** 63))


def batch_index_lists(n: int, batch_size: int, rank: int, world: int, generator: torch.Generator
                      ) -> list[Tensor]:
    """This rank's row indices for every step of one epoch."""
    perm = torch.randperm(n, generator=generator)
    out = []
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        share = idx.shape[0] // world
        if share == 0:
            break
        out.append(idx[rank * share:(rank + 1) * share])
    return out


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= world else 0)


class Batches:
    """Iterates the :class:`Batch` es of a split for one epoch."""

    def __init__(self, split, *, batch_size: int, device: torch.device, rank: int = 0, world: int = 1,
                 num_workers: int = 0, pin_memory: bool = False):
        self.split, self.batch_size, self.device = split, batch_size, device
        self.rank, self.world = rank, world
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.in_memory = isinstance(split, TensorSplit)
        if self.in_memory:
            self.inputs = move(split.inputs, device)
            self.targets = split.targets.to(device)

    def __len__(self) -> int:
        return steps_per_epoch(len(self.split), self.batch_size, self.world)

    def epoch(self, generator: torch.Generator, skip: int = 0) -> Iterator[Batch]:
        """This epoch's batches, leaving out the first ``skip`` (a resume mid-epoch)."""
        lists = batch_index_lists(len(self.split), self.batch_size, self.rank, self.world, generator)[skip:]
        if self.in_memory:
            for idx in lists:
                on_device = idx.to(self.device)
                yield Batch(index_inputs(self.inputs, on_device), self.targets.index_select(0, on_device), idx)
            return
        if not lists:
            return
        loader = torch.utils.data.DataLoader(
            self.split, batch_sampler=[i.tolist() for i in lists], num_workers=self.num_workers,
            pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(int(generator.initial_seed())),
            persistent_workers=False)
        for idx, sample in zip(lists, loader):
            yield from_collated(sample, idx).to(self.device, non_blocking=True)


def eval_batches(split, batch_size: int, device: torch.device, rank: int = 0, world: int = 1,
                 num_workers: int = 0) -> Iterator[tuple[Batch, Tensor | None]]:
    """This rank's share of a split in order, with the posterior where known.

    Every rank yields the same number of batches (the last may be empty), so
    that sharded models (FSDP) can run their collective forward on each.
    """
    n = len(split)
    rows = torch.arange(rank, n, world)
    per_rank = -(-n // world)
    starts = range(0, max(per_rank, 1), batch_size)
    if isinstance(split, TensorSplit):
        for start in starts:
            idx = rows[start:start + batch_size]
            post = None if split.posterior is None else split.posterior[idx].to(device)
            yield Batch(move(index_inputs(split.inputs, idx), device), split.targets[idx].to(device), idx), post
        return
    subset = torch.utils.data.Subset(split, rows.tolist())
    loader = iter(torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers))
    for start in starts:
        idx = rows[start:start + batch_size]
        if idx.numel() == 0:
            return  # an empty final batch cannot come from a DataLoader
        yield from_collated(next(loader), idx).to(device), None
