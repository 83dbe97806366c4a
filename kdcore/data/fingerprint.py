"""Identity of a training split and of a teacher, for stored and cached teacher signals.

A teacher store (:mod:`kdcore.signals.store`) and the teacher cache
(:mod:`kdcore.engine.teacher_source`) are keyed by sample index, so they are
valid only for the data and the teacher they were made from, and only where
reading a sample twice gives the same inputs. This module says:

- :func:`split_fingerprint`: a stable hash of a training split's contents (its
  length, target shape and the bytes of its tensors; for a split too large to
  hash whole, the targets and an evenly spaced sample of the inputs);
- :func:`random_views`: whether a split's augmentation is random. A split
  declares it with a ``random_views`` attribute (``True``: reading an index
  twice may give different inputs), or the dataset factory with
  ``DataSplits.meta["random_views"]``; in-memory :class:`kdcore.data.TensorSplit`
  splits are deterministic; any other split is probed (two reads of a few
  samples under different random seeds must agree);
- :func:`teacher_identity`: the teacher's backbone, parameters and the SHA-256
  of its checkpoint file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdcore.data import DataSplits, TensorSplit, index_inputs

#: a split whose tensors hold more bytes than this is hashed from a sample of rows
WHOLE_HASH_BYTES = 256 * 2**20
#: rows (or items of a split read one by one) hashed from a large split
SAMPLED_ROWS = 256
#: items read twice to probe a split that does not declare ``random_views``
PROBE_ITEMS = 3


def _tensors(value: Any) -> list[Tensor]:
    """The tensors of a sample, batch or mapping, in a fixed order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for k in sorted(value) for t in _tensors(value[k])]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return [torch.as_tensor(value)]


def _update(h: "hashlib._Hash", value: Any) -> None:
    for t in _tensors(value):
        t = t.detach().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        flat = t.contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


def _item(split, i: int):
    """Item ``i`` read under a fixed seed (a randomly augmented split still hashes stably)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return split[i]


def _spaced(n: int, count: int) -> list[int]:
    return sorted({round(j * (n - 1) / max(count - 1, 1)) for j in range(min(n, count))})


def split_fingerprint(split) -> str:
    """A hex SHA-256 of a split's contents (see the module docstring)."""
    n = len(split)
    h = hashlib.sha256(f"kdcore-split-v1 n={n}".encode())
    if isinstance(split, TensorSplit):
        _update(h, split.targets)
        size = sum(t.numel() * t.element_size() for t in _tensors(split.inputs))
        rows = slice(None) if size <= WHOLE_HASH_BYTES else torch.tensor(_spaced(n, SAMPLED_ROWS))
        _update(h, index_inputs(split.inputs, rows))
        return h.hexdigest()
    for i in _spaced(n, SAMPLED_ROWS):
        _update(h, _item(split, i))
    return h.hexdigest()


def _same(a: Any, b: Any) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return len(ta) == len(tb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb))


def random_views(splits: DataSplits) -> bool:
    """Whether the training split's augmentation is random (see the module docstring)."""
    split = splits.train
    declared = getattr(split, "random_views", None)
    if declared is None:
        declared = splits.meta.get("random_views")
    if declared is not None:
        return bool(declared)
    if isinstance(split, TensorSplit):
        return False
    for i in _spaced(len(split), PROBE_ITEMS):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            first = split[i]
            torch.manual_seed(2)
            second = split[i]
        if not _same(first, second):
            return True
    return False


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def teacher_identity(backbone: str, params: Mapping[str, Any], checkpoint: Path | None) -> dict[str, Any]:
    """``{"backbone", "params", "checkpoint_sha256"}`` (JSON-ready; the hash is None without a checkpoint)."""
    return {"backbone": backbone, "params": json.loads(json.dumps(dict(params), sort_keys=True, default=str)),
            "checkpoint_sha256": None if checkpoint is None else file_sha256(checkpoint)}
