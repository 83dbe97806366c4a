"""``kdcore capture CONFIG.toml --out STORE``: the teacher's top-k (or ``--sample K`` draws from
it) over the training split, once.

The command builds the dataset and the frozen teacher of a training config the
way the engine does, runs the teacher over the training split in sample order
(batches of ``--batch-size``, default ``run.eval_batch_size``) and writes a
store (:mod:`kdcore.signals.store`): shard after shard, each written atomically, with
the manifest first (``complete: false``) and last (``complete: true``, with the
SHA-256 of every shard). Run again with the same arguments, a capture checks
every shard already there (its presence, size and digest), keeps the good
ones and computes the others, giving the same bytes as an uninterrupted
capture: this finishes an interrupted capture and repairs a damaged store.
Draws (``--sample``) come from a generator seeded with ``run.seed`` and the sample
index, so they too are the same bytes every time. At token level, positions whose
target is -100 are not stored (``drops_ignored``).
Under ``torchrun`` rank ``r`` computes shards ``r, r + world, ...`` and rank 0
checks the store and writes the manifest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcore import config as cfg
from kdcore.common.errors import ConfigError, RunFailure
from kdcore.common.version import VERSION
from kdcore.config import resolve_path
from kdcore.data import TensorSplit, index_inputs
from kdcore.data import fingerprint
from kdcore.engine import capture_resume as resume
from kdcore.engine import distributed
from kdcore.engine.batches import from_collated, move
from kdcore.engine.capture_resume import CaptureStopped
from kdcore.engine.forward import forward
from kdcore.engine.models import build_data, build_teacher
from kdcore.engine.runtime import pick_device
from kdcore.engine.teacher_source import target_shape
from kdcore.losses.functional import IGNORE_INDEX
from kdcore.losses.outputs import Outputs
from kdcore.plugins import default_registry
from kdcore.plugins.registry import Registry
from kdcore.signals import store
from kdcore.signals.records import (DamagedRecord, Layout, check_values, choose_layout, draw, encode,
                                    encode_draws, top_k)

#: the default k (kept ids per position), at most the number of classes
DEFAULT_TOP_K = 128
#: the default shard size aims at this many bytes per shard
SHARD_BYTES = 64 * 2**20


def _batches(split, rows: range, batch_size: int, device: torch.device) -> Iterator[tuple[Any, torch.Tensor]]:
    """The inputs (on ``device``) and targets of ``rows`` of ``split`` in order, ``batch_size`` at a time."""
    if isinstance(split, TensorSplit):
        for start in range(rows.start, rows.stop, batch_size):
            part = slice(start, min(start + batch_size, rows.stop))
            yield move(index_inputs(split.inputs, part), device), split.targets[part]
        return
    subset = torch.utils.data.Subset(split, list(rows))
    for sample in torch.utils.data.DataLoader(subset, batch_size=batch_size):
        batch = from_collated(sample, torch.empty(0))
        yield move(batch.inputs, device), torch.as_tensor(batch.target)


def draw_seed(run_seed: int, sample: int) -> int:
    """The seed of the generator that draws sample ``sample``'s ids (``--sample``): fixed by the
    config's ``run.seed`` and the sample, whatever the batch size, shard size or rank."""
    return ((run_seed * 1_000_003 + sample) * 0x9E3779B1 + 0x5EED) % (2**63)


#: a teacher whose outputs hold only some positions (kdcore.Outputs.known) cannot be stored
PARTIAL_TEACHER = ("teacher: its outputs hold only some positions (a teacher with another tokenizer, "
                   "backbone cross_tokenizer), which a store cannot mark; train with the teacher running "
                   "(teacher.source = \"model\") instead of capturing it")


class TeacherNotFinite(RunFailure):
    """The teacher's outputs on a sample are not log-probabilities a store can hold (NaN):
    the capture stops before writing them (exit 1)."""


def _records(layout: Layout, logits: torch.Tensor, kept: torch.Tensor, first: int, run_seed: int) -> np.ndarray:
    """The records of the ``kept`` positions ``bool [b, positions]`` of the teacher's ``logits``
    ``[b, positions, C]`` on samples ``first, first + 1, ...``. Outputs a store's reader would
    refuse as damage (:func:`kdcore.signals.records.check_values`) are a :class:`DamagedRecord`
    whose row is the sample's within the batch."""
    if layout.sampled:
        draws = []
        for i in range(logits.shape[0]):
            try:
                draws.append(draw(logits[i][kept[i]], layout.k, draw_seed(run_seed, first + i)))
            except DamagedRecord as exc:
                raise DamagedRecord(i, exc.reason) from None
        return encode_draws(layout, torch.cat(draws))
    ids, logp, rest = top_k(logits[kept], layout.k)
    try:
        check_values(layout, ids, logp, rest)
    except DamagedRecord as exc:
        raise DamagedRecord(int(kept.reshape(-1).nonzero()[exc.row, 0]) // kept.shape[1], exc.reason) from None
    return encode(layout, ids, logp, rest)


def _shard_records(teacher, split, rows: range, batch_size: int, device: torch.device, layout: Layout,
                   autocast, positions: int, drops: bool, run_seed: int,
                   advance: Callable[[int], object] | None = None) -> np.ndarray:
    """The bytes of the shard of samples ``rows`` (:func:`kdcore.signals.store.shard_contents`:
    with ``drops``, positions whose target is -100 have no record); outputs a store's reader
    would refuse as damage stop the capture instead of being written. ``advance(samples)`` is
    called after each batch, so that a progress bar moves within a shard (a shard can take
    many minutes)."""
    parts, masks, start = [], [], rows.start
    with torch.no_grad():
        for inputs, target in _batches(split, rows, batch_size, device):
            with autocast():
                out = forward(teacher, inputs, teacher, (), torch.empty(0))
            if out.known is not None:
                raise ConfigError(PARTIAL_TEACHER)
            logits = Outputs.of(out).logits.float()
            b = logits.shape[0]
            logits = logits.reshape(b, positions, logits.shape[-1])
            kept = (target.reshape(b, positions) != IGNORE_INDEX if drops
                    else torch.ones(b, positions, dtype=torch.bool)).to(logits.device)
            try:
                parts.append(_records(layout, logits, kept, start, run_seed))
            except DamagedRecord as exc:
                raise TeacherNotFinite(f"capture: the teacher's outputs on training sample {start + exc.row} are "
                                       f"not log-probabilities ({exc.reason}); nothing of them was written; check "
                                       "the teacher's checkpoint, or capture with run.amp = \"off\"") from None
            masks.append(kept.cpu().numpy())
            start += b
            if advance is not None:
                advance(b)
    return store.shard_contents(np.concatenate(masks), np.concatenate(parts, axis=0), drops)


def _progress(total: int, initial: int, quiet: bool):
    """The capture's progress bar, counted in samples: ``total`` this rank captures,
    ``initial`` of them in the shards a resumed capture keeps (None when ``quiet``)."""
    if quiet:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="capture", unit="sample", dynamic_ncols=True)


def _arguments(config, overrides, top_k, sample, values, batch_size, shard_samples) -> list[str]:
    """The command line of this capture but ``--out`` (the manifest keeps it, so that a message
    about a damaged store can give the command that rewrites it)."""
    args = [str(config)]
    for flag, value in (("--top-k", top_k), ("--sample", sample), ("--values", None if values == "auto" else values),
                        ("--batch-size", batch_size), ("--shard-samples", shard_samples)):
        if value is not None:
            args += [flag, str(value)]
    for override in overrides:
        args += ["--set", override]
    return args


def capture(config: str | Path, out: str | Path, overrides: Iterable[str] = (), *, top_k: int | None = None,
            sample: int | None = None, values: str = "auto", batch_size: int | None = None,
            shard_samples: int | None = None, quiet: bool = False, registry: Registry | None = None) -> dict[str, Any]:
    """Write, finish or repair the store of ``config``'s teacher at ``out``; returns its manifest.
    ``top_k``: the k most likely ids per position (the default); ``sample``: that many draws
    from the teacher per position instead (their weights are counts, ``values`` does not apply)."""
    if top_k is not None and sample is not None:
        raise ConfigError("--sample: not allowed with --top-k (a store keeps the top k or draws, not both)")
    if sample is not None and values != "auto":
        raise ConfigError("--values: a sampled store (--sample) keeps counts of draws, not values; drop --values")
    overrides = list(overrides)
    conf = cfg.load(config, overrides)
    registry = registry or default_registry()
    if conf.source is not None:
        registry = registry.searching(str(Path(conf.source).resolve().parent))
    cfg.check_components(conf, registry)
    tc = conf.teacher
    if tc is None or tc.backbone is None:
        raise ConfigError("teacher.backbone: capture needs a [teacher] with its backbone and checkpoint")
    run = conf.run
    args = _arguments(config, overrides, top_k, sample, values, batch_size, shard_samples)
    dist = distributed.setup("cuda" if run.device == "cuda" or
                             (run.device == "auto" and torch.cuda.is_available()) else "cpu", run.dist_timeout_s)
    try:
        return _capture(conf, tc, Path(out), registry, dist, (top_k, sample), values, batch_size, shard_samples,
                        quiet, args)
    finally:
        distributed.teardown(dist)


def _capture(conf, tc, root: Path, registry, dist, kinds, values, batch_size, shard_samples, quiet, args):
    run = conf.run
    top_k, sample = kinds
    device = pick_device(run.device, dist.local_rank)
    data = build_data(conf, registry)
    if fingerprint.random_views(data) and not tc.signals.fixed_view:
        raise ConfigError("teacher.fixed_view: the training split's augmentation is random, so a store keyed by "
                          "sample index holds one view per sample; set teacher.fixed_view = true to accept "
                          "that (in capture and training), or turn the augmentation off")
    teacher = build_teacher(conf, data, registry).to(device)
    split, classes = data.train, data.num_classes
    kind = "top_k" if sample is None else "sample"
    k = sample if sample is not None else min(DEFAULT_TOP_K, classes) if top_k is None else top_k
    if values == "auto":
        values = "float32" if k == classes else "uint8"
    layout = choose_layout(classes, k, values, kind)
    shape = target_shape(split)
    positions = max(1, int(torch.Size(shape).numel()))
    drops = positions > 1 and resume.drops_ignored(root)
    n = len(split)
    if batch_size is not None and batch_size <= 0:
        raise ConfigError(f"--batch-size: must be > 0, got {batch_size}")
    if shard_samples is not None and shard_samples <= 0:
        raise ConfigError(f"--shard-samples: must be > 0, got {shard_samples}")
    per = shard_samples or max(1, SHARD_BYTES // (positions * layout.record_bytes + store.mask_row_bytes(
        {"positions": positions, store.DROPS: drops})))
    ckpt = None if tc.checkpoint is None else resolve_path(tc.checkpoint, conf.source)
    manifest: dict[str, Any] = {
        "format": store.FORMAT, "version": store.VERSION, "kdcore": VERSION, "complete": False,
        "kind": kind, "k": k, "num_classes": classes, "temperature": 1.0, "target_shape": list(shape),
        "positions": positions, "n": n, "shard_samples": per, "shards": store.shard_count(n, per),
        "layout": layout.to_json(), "fixed_view": tc.signals.fixed_view,
        "data": {"name": conf.data.name, "fingerprint": fingerprint.split_fingerprint(split)},
        "teacher": fingerprint.teacher_identity(tc.backbone, tc.params, ckpt),
        store.CAPTURE_ARGS: args, store.DIGESTS: {}, store.DROPS: drops,
        "sample_seed": run.seed if layout.sampled else None,
    }
    if dist.is_main:  # one rank checks --out and writes the manifest; the others then read it
        resume.start(root, manifest, quiet)
    dist.barrier()
    existing = store.read_manifest(root, "--out")
    if existing.get("complete"):
        if dist.is_main and not quiet:
            print(f"capture: {root} is complete already ({n} samples, {manifest['shards']} shard(s) verified)")
        return existing
    autocast = (contextlib.nullcontext if run.amp == "off" else
                lambda: torch.autocast(device.type, dtype=torch.bfloat16 if run.amp == "bf16" else torch.float16))
    done = existing[store.DIGESTS]  # the shards found whole
    mine = [j for j in range(manifest["shards"]) if j % dist.world == dist.rank]
    todo = [j for j in mine if store.shard_name(j) not in done]
    size = {j: min(n, (j + 1) * per) - j * per for j in mine}
    written: dict[str, str] = {}
    with _progress(sum(size.values()), sum(size.values()) - sum(size[j] for j in todo),
                   quiet or not dist.is_main) as bar:
        for j in todo:
            with _stops_resumably(root, j, manifest, len(done) + len(written)):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(run.seed * 1_000_003 + j)  # one fixed view per sample (fixed_view)
                    records = _shard_records(teacher, split, range(j * per, j * per + size[j]),
                                             batch_size or run.eval_batch_size, device, layout, autocast, positions,
                                             drops, run.seed, None if bar is None else bar.update)
                store.write_shard(root, j, records)
            written[store.shard_name(j)] = store.records_sha256(records)
    dist.barrier()
    if dist.is_main:
        manifest[store.DIGESTS] = resume.all_digests(root, manifest, {**done, **written})
        manifest.update(complete=True, bytes_per_position=layout.record_bytes,
                        total_bytes=store.total_bytes(root, manifest),
                        stored_positions=_stored_positions(root, manifest))
        store.write_manifest(root, manifest)
    dist.barrier()
    return manifest


def _stored_positions(root: Path, manifest: dict[str, Any]) -> int:
    """The number of records in a store's shards (positions whose target is not -100, where
    :data:`kdcore.signals.store.DROPS`)."""
    if not manifest.get(store.DROPS):
        return int(manifest["n"]) * int(manifest["positions"])
    return int(sum(store.stored_rows(root / store.shard_name(j), len(store.shard_samples_of(j, manifest)),
                                     manifest).sum() for j in range(int(manifest["shards"]))))


@contextlib.contextmanager
def _stops_resumably(root: Path, j: int, manifest: dict[str, Any], finished: int):
    """Turn a failure while computing or writing shard ``j`` into a :class:`CaptureStopped` that
    says the finished shards are kept and how to continue (a configuration error, a teacher
    that gives NaN and an interrupt pass as they are)."""
    try:
        yield
    except (ConfigError, TeacherNotFinite):
        raise
    except Exception as exc:
        cause = str(exc) if isinstance(exc, RunFailure) else f"{type(exc).__name__}: {exc}"
        raise CaptureStopped(f"capture stopped at {store.describe_shard(root, j, manifest)}: "
                             f"{(cause.splitlines() or [''])[0]}; the {finished} finished shard(s) are kept: "
                             "run the same kdcore capture command again to continue") from exc
