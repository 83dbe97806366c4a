"""The on-disk teacher store: top-k teacher log-probabilities, or draws from the teacher, per
position (docs/signals.md).

A store is a directory::

    manifest.json        what was captured, how it is coded, and from what
    shard-00000.bin      the records of samples [0, shard_samples)
    shard-00001.bin      ...

Every position (one per sample for classification, ``T`` per sample at token
level) has one fixed-size record of ``layout.record_bytes`` bytes, so the
records of sample ``i`` are rows ``(i % shard_samples) * positions ...`` of
shard ``i // shard_samples``. Where the manifest says ``drops_ignored`` (stores of
token-level data since format version 2), positions whose target is -100 have no
record: a shard then starts with one bitmap per sample, ``ceil(positions / 8)`` bytes,
bit ``t`` set where position ``t`` has a record, and the records of the set bits follow
in sample and position order. A top-k record holds, in this order:

- the k kept class ids, sorted ascending, as a bitmap of ``num_classes`` bits
  or Elias-Fano coded (``k * low_bits`` low bits, then the high parts in unary
  as ``k + ((num_classes - 1) >> low_bits)`` bits), whichever is smaller;
- their log-probabilities (natural log, temperature 1), in id order: float32,
  float16, or ``uint8`` codes ``q`` with ``log p = top - q * scale``;
- for ``uint8``: ``top`` (float32) and ``scale`` (float16);
- where ``k < num_classes``: ``log_rest`` (float32), the log of the teacher's
  probability mass outside the k ids.

A sampled record (``kind = "sample"``) holds only the K draws, sorted, repeats
included, Elias-Fano coded (:mod:`kdcore.signals.records`).

Bits are packed little-endian within bytes; numbers are little-endian. Files
are written atomically (a temporary file, then a rename), so a shard exists
whole or not at all, which is what makes an interrupted capture resumable.

The coding of one record and its value checks are in :mod:`kdcore.signals.records`.

Integrity: the manifest records the SHA-256 of every shard file
(``shard_sha256``), checked the first time a :class:`StoreReader` reads the
shard, and every record read is checked for values no capture writes
(:func:`~kdcore.signals.records.check_values`). Damage is named by file and sample, with the capture
command that rewrites it (:func:`capture_command`). Stores written before
digests existed are read with the value checks only.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdcore.common.errors import ConfigError, RunFailure
from kdcore.common.files import atomic_write
from kdcore.signals.records import DamagedRecord, Layout, check_values, decode, placeholder

FORMAT = "kdcore-teacher-store"
#: the format version this kdcore writes; 2 added sampled records and ``drops_ignored``
VERSION = 2
#: the format versions this kdcore reads
READS = (1, 2)
#: the manifest's key saying positions whose target is -100 have no record (absent: every position has one)
DROPS = "drops_ignored"
MANIFEST = "manifest.json"
#: the manifest's key for the SHA-256 (hex) of each shard file, by file name
DIGESTS = "shard_sha256"
#: the manifest's key for the arguments of the capture that wrote the store (all but ``--out``)
CAPTURE_ARGS = "capture_args"
#: records decoded at a time when a whole shard is checked (bounds the memory of the check)
_CHECK_ROWS = 2**16


class DamagedStore(RunFailure):
    """A shard of a store found missing or damaged while it is read (exit 1); the message
    names the file and the samples and gives the capture command that rewrites it."""


def shard_name(j: int) -> str:
    return f"shard-{j:05d}.bin"


# -- files ----------------------------------------------------------------------------------------
def write_shard(root: Path, j: int, records: np.ndarray) -> None:
    atomic_write(root / shard_name(j), records.tobytes())


def mask_row_bytes(manifest: Mapping[str, Any]) -> int:
    """Bytes of one sample's bitmap of stored positions (0 where every position is stored)."""
    return -(-int(manifest["positions"]) // 8) if manifest.get(DROPS) else 0


def shard_contents(kept: np.ndarray, records: np.ndarray, drops: bool) -> np.ndarray:
    """A shard file's bytes ``uint8 [size]``: with ``drops``, the bitmaps of ``kept`` ``bool
    [samples, positions]`` then ``records`` (those of the kept positions); else the records alone."""
    if not drops:
        return records.reshape(-1)
    bitmaps = np.packbits(kept.astype(np.uint8), axis=1, bitorder="little")
    return np.concatenate([bitmaps.reshape(-1), records.reshape(-1)])


def records_sha256(records: np.ndarray) -> str:
    """The SHA-256 (hex) of the shard file :func:`write_shard` makes of ``records``."""
    return hashlib.sha256(np.ascontiguousarray(records)).hexdigest()


def file_sha256(path: Path) -> str:
    """The SHA-256 (hex) of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> None:
    atomic_write(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def remove_partial(root: Path) -> None:
    """Delete the temporary files a killed writer left in ``root`` (a whole file never is one)."""
    for path in root.glob(".*.tmp"):
        path.unlink(missing_ok=True)


def capture_command(root: Path, manifest: Mapping[str, Any]) -> str:
    """The ``kdcore capture`` command that wrote (and rewrites) the store at ``root``, from the
    arguments its manifest records; a template where it records none (stores of kdcore 0.1)."""
    args = manifest.get(CAPTURE_ARGS)
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        return f"kdcore capture CONFIG.toml --out {shlex.quote(str(root))} (with the arguments it was made with)"
    return shlex.join(["kdcore", "capture", args[0], "--out", str(root), *args[1:]])


def _check_manifest(root: Path, manifest: dict[str, Any], where: str) -> None:
    """Refuse a manifest that lacks an entry or holds one that cannot be (a damaged file):
    one line naming it, and that the store must be captured anew."""
    try:
        layout = Layout.from_json(manifest["layout"])
        n, per, shards = int(manifest["n"]), int(manifest["shard_samples"]), int(manifest["shards"])
        sizes = [int(manifest["positions"]), int(manifest["layout"]["record_bytes"]),
                 *(int(s) for s in manifest["target_shape"])]
        problem = None
        if not isinstance(manifest["complete"], bool):
            problem = "its 'complete' is not true or false"
        elif n < 1 or per < 1 or min(sizes) < 0 or shards != shard_count(n, per):
            problem = "its sample and shard counts disagree"
        elif sizes[1] != layout.record_bytes:
            problem = "its layout's record_bytes disagrees with the layout"
        elif not isinstance(manifest.get(DIGESTS, {}), dict):
            problem = f"its {DIGESTS!r} is not a table"
        elif not isinstance(manifest.get(DROPS, False), bool):
            problem = f"its {DROPS!r} is not true or false"
    except KeyError as exc:
        problem = f"it lacks {exc.args[0]!r}"
    except (TypeError, ValueError, AttributeError):
        problem = "an entry of it has the wrong type"
    if problem is not None:
        raise ConfigError(f"{where}: {root / MANIFEST} is damaged ({problem}); delete {root} and capture it "
                          f"again: {capture_command(root, manifest)}")


def read_manifest(root: Path, where: str) -> dict[str, Any] | None:
    """The manifest of the store at ``root`` (None where there is none); ``where`` names the key in errors."""
    path = root / MANIFEST
    if not path.exists():
        return None
    if not path.is_file():  # a FIFO would block the read
        raise ConfigError(f"{where}: {path} is not a regular file; delete {root} and capture it again: "
                          f"{capture_command(root, {})}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: {path} is not a readable store manifest ({exc}); delete {root} and capture "
                          f"it again: {capture_command(root, {})}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{where}: {root} is not a kdcore teacher store (its manifest.json is not one)")
    if manifest.get("version") not in READS:
        raise ConfigError(f"{where}: {root} is a store of format version {manifest.get('version')!r}; "
                          f"this kdcore reads versions {', '.join(map(str, READS))}")
    _check_manifest(root, manifest, where)
    return manifest


def shard_count(n: int, shard_samples: int) -> int:
    return -(-n // shard_samples)


def shard_samples_of(j: int, manifest: Mapping[str, Any]) -> range:
    """The sample indices shard ``j`` holds."""
    n, per = int(manifest["n"]), int(manifest["shard_samples"])
    return range(j * per, min(n, (j + 1) * per))


def size_problem(root: Path, j: int, manifest: Mapping[str, Any]) -> str | None:
    """What is wrong with shard ``j``'s file short of reading it: None when it exists with the
    size the manifest implies, else "is missing" or its wrong size."""
    path = root / shard_name(j)
    samples, record = len(shard_samples_of(j, manifest)), int(manifest["layout"]["record_bytes"])
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    masks = samples * mask_row_bytes(manifest)
    if not masks:
        want = samples * int(manifest["positions"]) * record
        return None if size == want else f"has {size} bytes, not {want}"
    if size < masks or not path.is_file():
        return f"has {size} bytes, fewer than its {masks} bytes of stored-position bitmaps"
    want = masks + stored_rows(path, samples, manifest).sum() * record
    return None if size == want else f"has {size} bytes, not the {want} its bitmaps of stored positions imply"


def stored_rows(path: Path, samples: int, manifest: Mapping[str, Any]) -> np.ndarray:
    """The number of stored positions of each of the ``samples`` samples of a shard file whose
    bitmaps (:data:`DROPS`) are at ``path``: ``int64 [samples]``."""
    width = mask_row_bytes(manifest)
    with open(path, "rb") as f:
        bitmaps = np.frombuffer(f.read(samples * width), dtype=np.uint8).reshape(samples, width)
    return _unpack(bitmaps, int(manifest["positions"])).sum(1, dtype=np.int64)


def _unpack(bitmaps: np.ndarray, positions: int) -> np.ndarray:
    """``bool [samples, positions]`` from bitmaps ``uint8 [samples, ceil(positions / 8)]``."""
    return np.unpackbits(bitmaps, axis=1, count=positions, bitorder="little").astype(bool)


def shard_done(root: Path, j: int, manifest: Mapping[str, Any]) -> bool:
    """Whether shard ``j`` exists with the size the manifest implies."""
    return size_problem(root, j, manifest) is None


def describe_shard(root: Path, j: int, manifest: Mapping[str, Any]) -> str:
    """``ROOT/shard-0000j.bin (samples a..b)``, for messages."""
    samples = shard_samples_of(j, manifest)
    return f"{root / shard_name(j)} (samples {samples.start}..{samples.stop - 1})"


class StoreReader:
    """Reads a complete store by sample index (memory-mapped shards).

    The first read of a shard checks its file against the manifest's SHA-256 (where the
    manifest has one), and every record read goes through :func:`check_values`; damage
    is a :class:`DamagedStore` naming the shard, the sample and the command to rewrite it.
    Positions the store holds no record of (their target is -100, :data:`DROPS`) read as
    :func:`~kdcore.signals.records.placeholder`."""

    def __init__(self, root: Path, manifest: Mapping[str, Any]):
        self.root, self.manifest = root, manifest
        self.layout = Layout.from_json(manifest["layout"])
        self.n, self.shard_samples = int(manifest["n"]), int(manifest["shard_samples"])
        self.positions = int(manifest["positions"])
        self.target_shape = tuple(int(s) for s in manifest["target_shape"])
        self.digests: Mapping[str, str] = manifest.get(DIGESTS) or {}
        self._maps: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @classmethod
    def open(cls, root: str | Path, where: str = "teacher.store") -> "StoreReader":
        """The store at ``root``, refused (:class:`ConfigError` naming ``where``) where it is not a
        complete store or a shard is missing or of the wrong size."""
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(f"{where}: no teacher store at {root} (make one with `kdcore capture`)")
        manifest = read_manifest(root, where)
        if manifest is None:
            raise ConfigError(f"{where}: {root} holds no manifest.json (not a teacher store)")
        if not manifest.get("complete"):
            raise ConfigError(f"{where}: the capture into {root} is not complete; run the same capture again "
                              f"to finish it: {capture_command(root, manifest)}")
        bad = [(j, p) for j in range(int(manifest["shards"])) if (p := size_problem(root, j, manifest))]
        if bad:
            (j, problem), more = bad[0], len(bad) - 1
            raise ConfigError(f"{where}: {describe_shard(root, j, manifest)} {problem}"
                              f"{f' (and {more} more shards)' if more else ''}; run the same capture again to "
                              f"rewrite it: {capture_command(root, manifest)}")
        return cls(root, manifest)

    def _damaged(self, j: int, problem: str) -> DamagedStore:
        return DamagedStore(f"{describe_shard(self.root, j, self.manifest)} {problem}; run the same capture "
                            f"again to rewrite it: {capture_command(self.root, self.manifest)}")

    def _shard(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shard ``j``: which positions it stores ``bool [samples, positions]``, the first record
        row of each sample ``int64 [samples + 1]`` and its records memory-mapped; its size and
        digest checked the first time."""
        if j not in self._maps:
            path = self.root / shard_name(j)
            problem = size_problem(self.root, j, self.manifest)
            if problem is None and shard_name(j) in self.digests and file_sha256(path) != self.digests[shard_name(j)]:
                problem = "is damaged (its SHA-256 differs from the one in manifest.json)"
            if problem is not None:
                raise self._damaged(j, problem)
            samples = len(shard_samples_of(j, self.manifest))
            skip = samples * mask_row_bytes(self.manifest)
            if skip:
                kept = _unpack(np.fromfile(path, dtype=np.uint8, count=skip).reshape(samples, -1), self.positions)
            else:
                kept = np.ones((samples, self.positions), dtype=bool)
            starts = np.concatenate([[0], np.cumsum(kept.sum(1, dtype=np.int64))])
            rows = int(starts[-1])
            records = (np.memmap(path, dtype=np.uint8, mode="r", offset=skip, shape=(rows, self.layout.record_bytes))
                       if rows else np.empty((0, self.layout.record_bytes), dtype=np.uint8))
            self._maps[j] = (kept, starts, records)
        return self._maps[j]

    def _check_range(self, idx: np.ndarray) -> None:
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"sample index out of the store's range 0..{self.n - 1}")

    def kept(self, index: Tensor) -> Tensor:
        """Which positions of samples ``index`` ``[n]`` the store holds a record of: ``bool
        [n, *target_shape]`` (all but those whose target is -100 where :data:`DROPS`)."""
        idx = index.cpu().numpy().astype(np.int64)
        self._check_range(idx)
        out = np.empty((idx.size, self.positions), dtype=bool)
        for j in np.unique(idx // self.shard_samples):
            sel = np.nonzero(idx // self.shard_samples == j)[0]
            out[sel] = self._shard(int(j))[0][idx[sel] - j * self.shard_samples]
        return torch.from_numpy(out).view(idx.size, *self.target_shape)

    def records(self, index: Tensor) -> np.ndarray:
        """The records of samples ``index`` ``[n]``, in sample and position order: ``uint8
        [stored positions, record_bytes]`` (``n * positions`` rows where every position is stored)."""
        idx = index.cpu().numpy().astype(np.int64)
        self._check_range(idx)
        parts, order = [], []
        shards = idx // self.shard_samples
        for j in np.unique(shards):
            sel = np.nonzero(shards == j)[0]
            _, starts, records = self._shard(int(j))
            local = idx[sel] - j * self.shard_samples
            counts = starts[local + 1] - starts[local]
            first = np.repeat(starts[local] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
            parts.append(records[first + np.arange(counts.sum())])
            order.append(np.repeat(sel, counts))
        if not parts:
            return np.empty((0, self.layout.record_bytes), dtype=np.uint8)
        rows, owner = np.concatenate(parts), np.concatenate(order)
        return rows[np.argsort(owner, kind="stable")]

    def read(self, index: Tensor, kept: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(ids [n, *target_shape, k], logp [.., k], log_rest [n, *target_shape] or None)``,
        every record checked (:func:`~kdcore.signals.records.check_values`); positions without a
        record (:meth:`kept`, or ``kept`` where the caller has it already) hold
        :func:`~kdcore.signals.records.placeholder`."""
        kept = (self.kept(index) if kept is None else kept).reshape(-1)
        try:
            ids, logp, rest = decode(self.layout, self.records(index))
            check_values(self.layout, ids, logp, rest)
        except DamagedRecord as exc:
            flat = int(kept.nonzero()[exc.row, 0])
            sample = int(index[flat // self.positions])
            at = f"sample {sample}" + (f", position {flat % self.positions}" if self.positions > 1 else "")
            raise self._damaged(sample // self.shard_samples, f"holds a damaged record at {at} ({exc.reason})") \
                from None
        if not bool(kept.all()):
            ids, logp, rest = _with_placeholders(self.layout, kept, ids, logp, rest)
        shape = (index.shape[0], *self.target_shape)
        return (ids.view(*shape, -1), logp.view(*shape, -1), None if rest is None else rest.view(shape))

    def check_shard(self, j: int) -> None:
        """Read every record of shard ``j`` (a :class:`DamagedStore` where one is damaged)."""
        samples = shard_samples_of(j, self.manifest)
        step = max(1, _CHECK_ROWS // self.positions)
        for start in range(samples.start, samples.stop, step):
            self.read(torch.arange(start, min(start + step, samples.stop)))

    @property
    def bytes_per_position(self) -> int:
        return self.layout.record_bytes


def _with_placeholders(layout: Layout, kept: Tensor, ids: Tensor, logp: Tensor,
                       rest: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The decoded records of the ``kept`` positions ``bool [m]`` spread over all ``m``, the
    others holding :func:`~kdcore.signals.records.placeholder`."""
    full_ids, full_logp, full_rest = placeholder(layout, kept.shape[0])
    full_ids[kept], full_logp[kept] = ids, logp
    if full_rest is not None:
        full_rest[kept] = rest
    return full_ids, full_logp, full_rest


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
