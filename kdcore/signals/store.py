"""The on-disk teacher store: top-k teacher log-probabilities per position (docs/signals.md).

A store is a directory::

    manifest.json        what was captured, how it is coded, and from what
    shard-00000.bin      the records of samples [0, shard_samples)
    shard-00001.bin      ...

Every position (one per sample for classification, ``T`` per sample at token
level) has one fixed-size record of ``layout.record_bytes`` bytes, so the
records of sample ``i`` are rows ``(i % shard_samples) * positions ...`` of
shard ``i // shard_samples``. A record holds, in this order:

- the k kept class ids, sorted ascending, as a bitmap of ``num_classes`` bits
  or Elias-Fano coded (``k * low_bits`` low bits, then the high parts in unary
  as ``k + ((num_classes - 1) >> low_bits)`` bits), whichever is smaller;
- their log-probabilities (natural log, temperature 1), in id order: float32,
  float16, or ``uint8`` codes ``q`` with ``log p = top - q * scale``;
- for ``uint8``: ``top`` (float32) and ``scale`` (float16);
- where ``k < num_classes``: ``log_rest`` (float32), the log of the teacher's
  probability mass outside the k ids.

Bits are packed little-endian within bytes; numbers are little-endian. Files
are written atomically (a temporary file, then a rename), so a shard exists
whole or not at all, which is what makes an interrupted capture resumable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor

from kdcore.common.errors import ConfigError
from kdcore.common.files import atomic_write

FORMAT = "kdcore-teacher-store"
VERSION = 1
MANIFEST = "manifest.json"
VALUE_CODINGS = ("float32", "float16", "uint8")
#: uint8 codes span [0, 255]
_LEVELS = 255


def shard_name(j: int) -> str:
    return f"shard-{j:05d}.bin"


@attrs.frozen
class Layout:
    """How one position's record is coded (see the module docstring)."""

    num_classes: int
    k: int
    values: str
    ids: str          # "bitmap" or "elias-fano"
    low_bits: int = 0

    @property
    def full(self) -> bool:
        """Whether every class is kept (then there is no tail bucket)."""
        return self.k == self.num_classes

    @property
    def _upper_bits(self) -> int:
        return self.k + ((self.num_classes - 1) >> self.low_bits)

    @property
    def ids_bytes(self) -> int:
        bits = self.num_classes if self.ids == "bitmap" else self.k * self.low_bits + self._upper_bits
        return -(-bits // 8)

    @property
    def values_bytes(self) -> int:
        return self.k * {"float32": 4, "float16": 2, "uint8": 1}[self.values]

    @property
    def header_bytes(self) -> int:
        return (6 if self.values == "uint8" else 0) + (0 if self.full else 4)

    @property
    def record_bytes(self) -> int:
        return self.ids_bytes + self.values_bytes + self.header_bytes

    def to_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "record_bytes": self.record_bytes}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Layout":
        return cls(int(d["num_classes"]), int(d["k"]), str(d["values"]), str(d["ids"]), int(d.get("low_bits", 0)))


def choose_layout(num_classes: int, k: int, values: str) -> Layout:
    """The smallest id coding for ``k`` of ``num_classes`` ids, with the given value coding."""
    if values not in VALUE_CODINGS:
        raise ConfigError(f"--values: must be one of {', '.join(VALUE_CODINGS)}, got {values!r}")
    if not 1 <= k <= num_classes:
        raise ConfigError(f"--top-k: must be in 1 .. {num_classes} (the number of classes), got {k}")
    best = Layout(num_classes, k, values, "bitmap")
    for low in range(0, max(num_classes.bit_length(), 1) + 1):
        ef = Layout(num_classes, k, values, "elias-fano", low)
        if ef.ids_bytes < best.ids_bytes:
            best = ef
    return best


# -- coding ---------------------------------------------------------------------------------------
def _bits(values: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` low bits of ``values`` ``[..., n]`` as ``[..., n * width]`` (least significant first)."""
    shifts = np.arange(width, dtype=np.int64)
    return ((values[..., None] >> shifts) & 1).astype(np.uint8).reshape(*values.shape[:-1], -1)


def _ones_positions(bits: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the set bits of each row (exactly ``k`` per row) ``[m, k]``."""
    rows, cols = np.nonzero(bits)
    if rows.shape[0] != bits.shape[0] * k:
        raise ValueError("damaged store: a record does not hold k ids")
    return cols.reshape(bits.shape[0], k)


def encode(layout: Layout, ids: Tensor, logp: Tensor, log_rest: Tensor | None) -> np.ndarray:
    """Records ``uint8 [m, record_bytes]`` of ``m`` positions: ``ids`` ``[m, k]`` sorted
    ascending, their log-probabilities ``logp`` ``[m, k]`` and ``log_rest`` ``[m]``."""
    ids_np = ids.cpu().numpy().astype(np.int64)
    m, k = ids_np.shape
    if layout.ids == "bitmap":
        bits = np.zeros((m, layout.num_classes), dtype=np.uint8)
        np.put_along_axis(bits, ids_np, 1, axis=1)
    else:
        low = layout.low_bits
        upper = np.zeros((m, layout._upper_bits), dtype=np.uint8)
        np.put_along_axis(upper, (ids_np >> low) + np.arange(k), 1, axis=1)
        bits = np.concatenate([_bits(ids_np & ((1 << low) - 1), low), upper], axis=1)
    parts = [np.packbits(bits, axis=1, bitorder="little")]
    lp = logp.detach().double().cpu().numpy()
    if layout.values == "uint8":
        top = lp.max(axis=1).astype(np.float32)
        spread = (top.astype(np.float64)[:, None] - lp).max(axis=1)
        scale = np.where(spread > 0, spread / _LEVELS, 1.0).astype(np.float16)
        scale = np.where(scale > 0, scale, np.float16(np.finfo(np.float16).tiny))  # no zero step
        q = np.rint((top.astype(np.float64)[:, None] - lp) / scale.astype(np.float64)[:, None])
        parts += [np.clip(q, 0, _LEVELS).astype(np.uint8), top[:, None].view(np.uint8),
                  scale[:, None].view(np.uint8)]
    else:
        parts.append(lp.astype(np.dtype(layout.values).newbyteorder("<")).view(np.uint8))
    if not layout.full:
        parts.append(log_rest.detach().double().cpu().numpy().astype("<f4")[:, None].view(np.uint8))
    out = np.ascontiguousarray(np.concatenate(parts, axis=1))
    assert out.shape[1] == layout.record_bytes
    return out


def decode(layout: Layout, records: np.ndarray) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(ids int64 [m, k], logp float32 [m, k], log_rest float32 [m] or None)`` from records."""
    m, k = records.shape[0], layout.k
    records = np.ascontiguousarray(records)
    cut = np.cumsum([layout.ids_bytes, layout.values_bytes])
    bits = np.unpackbits(records[:, :cut[0]], axis=1, bitorder="little")
    if layout.ids == "bitmap":
        ids = _ones_positions(bits[:, :layout.num_classes], k)
    else:
        low = layout.low_bits
        low_part = bits[:, :k * low].reshape(m, k, low).astype(np.int64)
        lows = (low_part << np.arange(low, dtype=np.int64)).sum(-1) if low else np.zeros((m, k), np.int64)
        upper = bits[:, k * low:k * low + layout._upper_bits]
        ids = ((_ones_positions(upper, k) - np.arange(k)) << low) | lows
    vals = records[:, cut[0]:cut[1]]
    at = cut[1]
    if layout.values == "uint8":
        top = records[:, at:at + 4].copy().view("<f4")
        scale = records[:, at + 4:at + 6].copy().view("<f2").astype(np.float32)
        logp = top - vals.astype(np.float32) * scale
        at += 6
    else:
        logp = vals.copy().view(np.dtype(layout.values).newbyteorder("<")).astype(np.float32)
    rest = None
    if not layout.full:
        rest = torch.from_numpy(records[:, at:at + 4].copy().view("<f4")[:, 0].astype(np.float32))
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(np.ascontiguousarray(logp)), rest


def top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """The teacher's top-k of ``logits`` ``[m, C]`` at temperature 1: ids sorted ascending,
    their log-probabilities and the log of the remaining mass (None when ``k = C``), in float64."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    _, ids = logp.topk(k, dim=-1)
    ids, _ = ids.sort(dim=-1)
    kept = logp.gather(-1, ids)
    rest = None
    if k < logits.shape[-1]:
        rest = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)
    return ids, kept, rest


# -- files ----------------------------------------------------------------------------------------
def write_shard(root: Path, j: int, records: np.ndarray) -> None:
    atomic_write(root / shard_name(j), records.tobytes())


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> None:
    atomic_write(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def remove_partial(root: Path) -> None:
    """Delete the temporary files a killed writer left in ``root`` (a whole file never is one)."""
    for path in root.glob(".*.tmp"):
        path.unlink(missing_ok=True)


def read_manifest(root: Path, where: str) -> dict[str, Any] | None:
    """The manifest of the store at ``root`` (None where there is none); ``where`` names the key in errors."""
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: {path} is not a readable store manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{where}: {root} is not a kdcore teacher store (its manifest.json is not one)")
    if manifest.get("version") != VERSION:
        raise ConfigError(f"{where}: {root} is a store of format version {manifest.get('version')!r}; "
                          f"this kdcore reads version {VERSION}")
    return manifest


def shard_count(n: int, shard_samples: int) -> int:
    return -(-n // shard_samples)


def shard_done(root: Path, j: int, manifest: Mapping[str, Any]) -> bool:
    """Whether shard ``j`` exists with the size the manifest implies."""
    path = root / shard_name(j)
    n, per = int(manifest["n"]), int(manifest["shard_samples"])
    rows = (min(n, (j + 1) * per) - j * per) * int(manifest["positions"])
    return path.exists() and path.stat().st_size == rows * int(manifest["layout"]["record_bytes"])


class StoreReader:
    """Reads a complete store by sample index (memory-mapped shards)."""

    def __init__(self, root: Path, manifest: Mapping[str, Any]):
        self.root, self.manifest = root, manifest
        self.layout = Layout.from_json(manifest["layout"])
        self.n, self.shard_samples = int(manifest["n"]), int(manifest["shard_samples"])
        self.positions = int(manifest["positions"])
        self.target_shape = tuple(int(s) for s in manifest["target_shape"])
        self._maps: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, root: str | Path, where: str = "teacher.store") -> "StoreReader":
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(f"{where}: no teacher store at {root} (make one with `kdcore capture`)")
        manifest = read_manifest(root, where)
        if manifest is None:
            raise ConfigError(f"{where}: {root} holds no manifest.json (not a teacher store)")
        if not manifest.get("complete"):
            raise ConfigError(f"{where}: the capture into {root} is not complete; run the same "
                              "`kdcore capture` again to finish it")
        missing = [j for j in range(int(manifest["shards"])) if not shard_done(root, j, manifest)]
        if missing:
            raise ConfigError(f"{where}: {root} misses or has damaged shard(s) "
                              f"{', '.join(shard_name(j) for j in missing[:3])}")
        return cls(root, manifest)

    def _shard(self, j: int) -> np.ndarray:
        if j not in self._maps:
            rows = (min(self.n, (j + 1) * self.shard_samples) - j * self.shard_samples) * self.positions
            self._maps[j] = np.memmap(self.root / shard_name(j), dtype=np.uint8, mode="r",
                                      shape=(rows, self.layout.record_bytes))
        return self._maps[j]

    def records(self, index: Tensor) -> np.ndarray:
        """The records of samples ``index`` ``[n]``: ``uint8 [n * positions, record_bytes]``."""
        idx = index.cpu().numpy().astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"sample index out of the store's range 0..{self.n - 1}")
        out = np.empty((idx.size, self.positions, self.layout.record_bytes), dtype=np.uint8)
        shards = idx // self.shard_samples
        for j in np.unique(shards):
            sel = np.nonzero(shards == j)[0]
            rows = (idx[sel] - j * self.shard_samples)[:, None] * self.positions + np.arange(self.positions)
            out[sel] = self._shard(int(j))[rows.reshape(-1)].reshape(sel.size, self.positions, -1)
        return out.reshape(-1, self.layout.record_bytes)

    def read(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(ids [n, *target_shape, k], logp [.., k], log_rest [n, *target_shape] or None)``."""
        ids, logp, rest = decode(self.layout, self.records(index))
        shape = (index.shape[0], *self.target_shape)
        return (ids.view(*shape, -1), logp.view(*shape, -1), None if rest is None else rest.view(shape))

    @property
    def bytes_per_position(self) -> int:
        return self.layout.record_bytes


def total_bytes(root: Path, manifest: Mapping[str, Any]) -> int:
    """The bytes of a store's shards."""
    return sum((root / shard_name(j)).stat().st_size for j in range(int(manifest["shards"])))


def check_store(manifest: Mapping[str, Any], root: Path, *, fingerprint: str, num_classes: int,
                target_shape: tuple[int, ...], n: int, teacher: Mapping[str, Any] | None,
                where: str = "teacher.store") -> None:
    """Refuse (:class:`ConfigError` naming ``where``) a store made for other data or another teacher."""
    data = manifest.get("data", {})
    if data.get("fingerprint") != fingerprint or int(manifest["n"]) != n:
        raise ConfigError(f"{where}: {root} was captured from other data (dataset {data.get('name')!r}, "
                          f"{manifest['n']} training samples, fingerprint {str(data.get('fingerprint'))[:12]}); "
                          f"this run's training split has {n} samples, fingerprint {fingerprint[:12]}")
    if int(manifest["layout"]["num_classes"]) != num_classes or tuple(manifest["target_shape"]) != target_shape:
        raise ConfigError(f"{where}: {root} holds {manifest['layout']['num_classes']} classes per position "
                          f"and targets of shape {manifest['target_shape']}; this run has {num_classes} "
                          f"and {list(target_shape)}")
    if teacher is not None:
        stored = manifest.get("teacher", {})
        for key in ("backbone", "params", "checkpoint_sha256"):
            if stored.get(key) != teacher.get(key):
                what = "checkpoint file" if key == "checkpoint_sha256" else key
                raise ConfigError(f"{where}: {root} was captured from another teacher ({what} differs from "
                                  "this config's [teacher]); capture it again or drop the teacher's "
                                  "backbone from [teacher] to skip this check")
    if not math.isclose(float(manifest.get("temperature", 1.0)), 1.0):
        raise ConfigError(f"{where}: {root} was captured at temperature {manifest['temperature']}; "
                          "training reads stores captured at temperature 1")
