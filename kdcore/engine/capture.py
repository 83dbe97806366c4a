"""``kdcore capture CONFIG.toml --out STORE``: the teacher's top-k over the training split, once.

The command builds the dataset and the frozen teacher of a training config the
way the engine does, runs the teacher over the training split in sample order
(batches of ``--batch-size``, default ``run.eval_batch_size``) and writes a
store (:mod:`kdcore.signals.store`): shard after shard, each written atomically, with
the manifest first (``complete: false``) and last (``complete: true``). An
interrupted capture run again with the same arguments keeps the shards it
finished and computes the others, giving the same bytes as an uninterrupted
one. Under ``torchrun`` rank ``r`` computes shards ``r, r + world, ...`` and
rank 0 writes the manifest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcore import config as cfg
from kdcore.common.errors import ConfigError
from kdcore.common.version import VERSION
from kdcore.config import resolve_path
from kdcore.data import TensorSplit, index_inputs
from kdcore.data import fingerprint
from kdcore.engine import distributed
from kdcore.engine.batches import from_collated, move
from kdcore.engine.forward import forward
from kdcore.engine.models import build_data, build_teacher
from kdcore.engine.runtime import pick_device
from kdcore.engine.teacher_source import target_shape
from kdcore.losses.outputs import Outputs
from kdcore.plugins import default_registry
from kdcore.plugins.registry import Registry
from kdcore.signals import store

#: the default k (kept ids per position), at most the number of classes
DEFAULT_TOP_K = 128
#: the default shard size aims at this many bytes per shard
SHARD_BYTES = 64 * 2**20
#: manifest entries that must agree for a capture to continue into an existing store
_SAME = ("k", "num_classes", "temperature", "target_shape", "positions", "n", "shard_samples", "shards",
         "layout", "data", "teacher", "fixed_view")


def _batches(split, rows: range, batch_size: int, device: torch.device) -> Iterator[Any]:
    """The inputs of ``rows`` of ``split`` in order, ``batch_size`` at a time, on ``device``."""
    if isinstance(split, TensorSplit):
        for start in range(rows.start, rows.stop, batch_size):
            yield move(index_inputs(split.inputs, slice(start, min(start + batch_size, rows.stop))), device)
        return
    subset = torch.utils.data.Subset(split, list(rows))
    for sample in torch.utils.data.DataLoader(subset, batch_size=batch_size):
        yield move(from_collated(sample, torch.empty(0)).inputs, device)


def _shard_records(teacher, split, rows: range, batch_size: int, device: torch.device, layout: store.Layout,
                   autocast) -> np.ndarray:
    parts = []
    with torch.no_grad():
        for inputs in _batches(split, rows, batch_size, device):
            with autocast():
                out = forward(teacher, inputs, teacher, (), torch.empty(0))
            logits = Outputs.of(out).logits.float()
            ids, logp, rest = store.top_k(logits.reshape(-1, logits.shape[-1]), layout.k)
            parts.append(store.encode(layout, ids, logp, rest))
    return np.concatenate(parts, axis=0)


def _progress(total: int, initial: int, quiet: bool):
    if quiet:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="capture", unit="sample", dynamic_ncols=True)


def _check_existing(root: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The store already at ``root`` (None: none), refused where it is another capture."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out: {root} exists and is not a directory")
    existing = store.read_manifest(root, "--out") if root.is_dir() else None
    if existing is None:
        if root.is_dir() and any(root.iterdir()):
            raise ConfigError(f"--out: {root} exists and holds files but no teacher store; choose another --out")
        return None
    for key in _SAME:
        if existing.get(key) != manifest[key]:
            raise ConfigError(f"--out: {root} holds a capture with another {key!r} (of another teacher, data "
                              "or settings); choose another --out, or delete it to capture again")
    return existing


def capture(config: str | Path, out: str | Path, overrides: Iterable[str] = (), *, top_k: int | None = None,
            values: str = "auto", batch_size: int | None = None, shard_samples: int | None = None,
            quiet: bool = False, registry: Registry | None = None) -> dict[str, Any]:
    """Write (or finish) the store of ``config``'s teacher at ``out``; returns its manifest."""
    conf = cfg.load(config, overrides)
    registry = registry or default_registry()
    if conf.source is not None:
        registry = registry.searching(str(Path(conf.source).resolve().parent))
    cfg.check_components(conf, registry)
    tc = conf.teacher
    if tc is None or tc.backbone is None:
        raise ConfigError("teacher.backbone: capture needs a [teacher] with its backbone and checkpoint")
    run = conf.run
    dist = distributed.setup("cuda" if run.device == "cuda" or
                             (run.device == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        return _capture(conf, tc, Path(out), registry, dist, top_k, values, batch_size, shard_samples, quiet)
    finally:
        distributed.teardown(dist)


def _capture(conf, tc, root: Path, registry, dist, top_k, values, batch_size, shard_samples, quiet):
    run = conf.run
    device = pick_device(run.device, dist.local_rank)
    data = build_data(conf, registry)
    if fingerprint.random_views(data) and not tc.signals.fixed_view:
        raise ConfigError("teacher.fixed_view: the training split's augmentation is random, so a store keyed by "
                          "sample index holds one view per sample; set teacher.fixed_view = true to accept "
                          "that (in capture and training), or turn the augmentation off")
    teacher = build_teacher(conf, data, registry).to(device)
    split, classes = data.train, data.num_classes
    k = min(DEFAULT_TOP_K, classes) if top_k is None else top_k
    if values == "auto":
        values = "float32" if k == classes else "uint8"
    layout = store.choose_layout(classes, k, values)
    shape = target_shape(split)
    positions = max(1, int(torch.Size(shape).numel()))
    n = len(split)
    if batch_size is not None and batch_size <= 0:
        raise ConfigError(f"--batch-size: must be > 0, got {batch_size}")
    if shard_samples is not None and shard_samples <= 0:
        raise ConfigError(f"--shard-samples: must be > 0, got {shard_samples}")
    per = shard_samples or max(1, SHARD_BYTES // (positions * layout.record_bytes))
    ckpt = None if tc.checkpoint is None else resolve_path(tc.checkpoint, conf.source)
    manifest: dict[str, Any] = {
        "format": store.FORMAT, "version": store.VERSION, "kdcore": VERSION, "complete": False,
        "k": k, "num_classes": classes, "temperature": 1.0, "target_shape": list(shape),
        "positions": positions, "n": n, "shard_samples": per, "shards": store.shard_count(n, per),
        "layout": layout.to_json(), "fixed_view": tc.signals.fixed_view,
        "data": {"name": conf.data.name, "fingerprint": fingerprint.split_fingerprint(split)},
        "teacher": fingerprint.teacher_identity(tc.backbone, tc.params, ckpt),
    }
    if dist.is_main:  # one rank looks at --out and writes the manifest; the others then read it
        existing = _check_existing(root, manifest)
        if existing is None or not existing.get("complete"):
            if existing is not None:
                store.remove_partial(root)  # what a killed capture was writing
            store.write_manifest(root, manifest)
    dist.barrier()
    existing = store.read_manifest(root, "--out")
    if existing is not None and existing.get("complete"):
        if dist.is_main and not quiet:
            print(f"capture: {root} is complete already ({n} samples)")
        return existing
    autocast = (contextlib.nullcontext if run.amp == "off" else
                lambda: torch.autocast(device.type, dtype=torch.bfloat16 if run.amp == "bf16" else torch.float16))
    mine = [j for j in range(manifest["shards"]) if j % dist.world == dist.rank]
    todo = [j for j in mine if not store.shard_done(root, j, manifest)]
    size = {j: min(n, (j + 1) * per) - j * per for j in mine}
    with _progress(sum(size.values()), sum(size.values()) - sum(size[j] for j in todo),
                   quiet or not dist.is_main) as bar:
        for j in todo:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(run.seed * 1_000_003 + j)  # one fixed view per sample (fixed_view)
                records = _shard_records(teacher, split, range(j * per, j * per + size[j]),
                                         batch_size or run.eval_batch_size, device, layout, autocast)
            store.write_shard(root, j, records)
            if bar is not None:
                bar.update(size[j])
    dist.barrier()
    if dist.is_main:
        missing = [j for j in range(manifest["shards"]) if not store.shard_done(root, j, manifest)]
        if missing:
            raise RuntimeError(f"capture: shard(s) {missing[:3]} of {root} were not written")
        manifest.update(complete=True, bytes_per_position=layout.record_bytes,
                        total_bytes=store.total_bytes(root, manifest))
        store.write_manifest(root, manifest)
    dist.barrier()
    return manifest
