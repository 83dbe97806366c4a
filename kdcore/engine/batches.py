"""Deterministic, resumable batching, sharded over DDP ranks.

Each epoch's order is a permutation drawn from a generator seeded by
``(seed, epoch)``, so an epoch can be replayed after a resume without any
saved sampler state. With ``world`` ranks, every global batch of
``batch_size`` rows is split into equal contiguous shares, one per rank (the
last batch is cut to a multiple of ``world``), so 2 ranks with half a batch
each see exactly the rows of 1 process with the full batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from kdcore.data import TensorSplit


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
    """Iterates ``(inputs, targets)`` of a split for one epoch."""

    def __init__(self, split, *, batch_size: int, device: torch.device, rank: int = 0, world: int = 1,
                 num_workers: int = 0, pin_memory: bool = False):
        self.split, self.batch_size, self.device = split, batch_size, device
        self.rank, self.world = rank, world
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.in_memory = isinstance(split, TensorSplit)
        if self.in_memory:
            self.inputs = split.inputs.to(device)
            self.targets = split.targets.to(device)

    def __len__(self) -> int:
        return steps_per_epoch(len(self.split), self.batch_size, self.world)

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        lists = batch_index_lists(len(self.split), self.batch_size, self.rank, self.world, generator)
        if self.in_memory:
            for idx in lists:
                idx = idx.to(self.device)
                yield self.inputs.index_select(0, idx), self.targets.index_select(0, idx)
            return
        loader = torch.utils.data.DataLoader(
            self.split, batch_sampler=[i.tolist() for i in lists], num_workers=self.num_workers,
            pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(int(generator.initial_seed())),
            persistent_workers=False)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def eval_batches(split, batch_size: int, device: torch.device, rank: int = 0, world: int = 1,
                 num_workers: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """This rank's share of a split in order, with the posterior where known."""
    n = len(split)
    rows = torch.arange(rank, n, world)
    if isinstance(split, TensorSplit):
        for start in range(0, rows.shape[0], batch_size):
            idx = rows[start:start + batch_size]
            post = None if split.posterior is None else split.posterior[idx].to(device)
            yield split.inputs[idx].to(device), split.targets[idx].to(device), post
        return
    subset = torch.utils.data.Subset(split, rows.tolist())
    for x, y in torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers):
        yield x.to(device), y.to(device), None
