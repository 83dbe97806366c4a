"""The teachers' evaluation for a run's summary, computed once per teacher and data.

A teacher is frozen, so its metrics on the reported split (and its top-1
predictions, from which the student's agreement with it is computed) depend
only on its weights, its backbone and parameters, the split, and the
evaluation settings. :func:`evaluate_teachers` keeps them in a small cache
(``$KDCORE_CACHE_DIR/teacher-eval/``, default ``~/.cache/kdcore/teacher-eval/``):
per entry a JSON file (the key, the metrics, the SHA-256 of the predictions)
and a tensor file of the predictions, both written atomically; later runs of
the same teacher read them instead of running it again. A teacher without a
checkpoint file (a backbone that loads its own weights) is evaluated every run:
nothing safe identifies its weights. A damaged or unreadable entry is ignored
with a one-line warning and computed again; a cache directory that cannot be
written only warns. ``run.evaluate_teacher = false`` skips the teachers'
evaluation (and so the agreement) altogether.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdcore.common.errors import RunFailure
from kdcore.common.files import atomic_torch_save, atomic_write
from kdcore.config import resolve_path
from kdcore.data import fingerprint
from kdcore.engine.evaluate import evaluate_top1

#: the entries' format; a change of what an entry means changes it
FORMAT = 1


def cache_dir() -> Path:
    """``$KDCORE_CACHE_DIR/teacher-eval`` (default ``~/.cache/kdcore/teacher-eval``)."""
    root = os.environ.get("KDCORE_CACHE_DIR") or "~/.cache/kdcore"
    return Path(root).expanduser() / "teacher-eval"


def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def cache_key(trainer, name: str, split, report: str) -> dict[str, Any] | None:
    """What teacher ``name``'s evaluation on ``split`` depends on (None: not cacheable, no checkpoint)."""
    config = trainer.config
    mc = config.teacher_tables()[name]
    if mc.checkpoint is None:
        return None
    ckpt = resolve_path(mc.checkpoint, config.source)
    run, dist = config.run, trainer.dist
    return {"format": FORMAT, "torch": torch.__version__,
            "teacher": fingerprint.teacher_identity(mc.backbone, mc.params, ckpt),
            "data": {"name": config.data.name, "params": _json_ready(config.data.params), "split": report,
                     "fingerprint": fingerprint.split_fingerprint(split)},
            "eval": {"batch_size": run.eval_batch_size, "amp": run.amp, "device": trainer.device.type,
                     "channels_last": run.channels_last, "rank": dist.rank, "world": dist.world}}


def _paths(key: dict[str, Any]) -> tuple[Path, Path]:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    root = cache_dir()
    return root / f"{digest}.json", root / f"{digest}.pt"


def _damaged(path: Path, why: str, name: str) -> None:
    warnings.warn(f"teacher-eval cache entry {path} is damaged ({why}); evaluating teacher {name!r} again",
                  stacklevel=3)


def read_entry(key: dict[str, Any], name: str) -> tuple[dict[str, float], Tensor] | None:
    """The cached metrics and predictions for ``key``, or None (absent, or damaged: warned)."""
    meta_path, top_path = _paths(key)
    try:
        entry = json.loads(meta_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):  # no entry (or no cache folder) yet
        return None
    except (OSError, ValueError) as exc:
        _damaged(meta_path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", name)
        return None
    metrics = entry.get("metrics") if isinstance(entry, dict) else None
    if not isinstance(metrics, dict) or entry.get("key") != key or not all(
            isinstance(v, (int, float)) for v in metrics.values()):
        _damaged(meta_path, "not an entry for this teacher and data", name)
        return None
    try:
        if fingerprint.file_sha256(top_path) != entry.get("predictions_sha256"):
            _damaged(top_path, "its SHA-256 differs from the one in its .json", name)
            return None
        top1 = torch.load(top_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a missing, unreadable or malformed predictions file
        _damaged(top_path, f"{type(exc).__name__}", name)
        return None
    if not isinstance(top1, Tensor) or top1.dtype != torch.int32 or top1.dim() != 1:
        _damaged(top_path, "not a vector of predictions", name)
        return None
    return metrics, top1


def write_entry(key: dict[str, Any], metrics: dict[str, float], top1: Tensor) -> None:
    """Keep an evaluation for later runs (the predictions first, the JSON that points at them
    last); a directory that cannot be written only warns."""
    meta_path, top_path = _paths(key)
    try:
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(top1, top_path)
        entry = {"key": key, "metrics": metrics, "predictions_sha256": fingerprint.file_sha256(top_path)}
        atomic_write(meta_path, json.dumps(entry, indent=1, sort_keys=True) + "\n")
    except (OSError, RunFailure) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warnings.warn(f"cannot write the teacher-eval cache in {meta_path.parent} ({why}); the teacher is "
                      "evaluated again next run (set KDCORE_CACHE_DIR to a writable directory)", stacklevel=2)


def evaluate_teacher(trainer, name: str, split, report: str) -> tuple[dict[str, float], Tensor] | None:
    """Teacher ``name``'s metrics on ``split`` (keys ``{report}_acc``, ...) and its top-1
    predictions, from the cache where every rank has them, else computed (and kept);
    None, with a warning, for a teacher whose outputs are over another set of classes
    than the data's (a cross-tokenizer teacher over its own vocabulary)."""
    model = trainer.teachers[name]
    key = cache_key(trainer, name, split, report)
    hit = read_entry(key, name) if key is not None else None
    everywhere = trainer.dist.sum_(torch.tensor([float(hit is not None)], device=trainer.device))
    if hit is not None and int(everywhere.item()) == trainer.dist.world:  # all ranks agree, or none reads
        return hit
    run = trainer.config.run
    metrics, top1 = evaluate_top1(model, split, report, trainer.runtime, batch_size=run.eval_batch_size,
                                  num_workers=run.num_workers, classes=trainer.data.num_classes)
    if top1 is None:
        warnings.warn(f"teacher {name!r} predicts over other classes than the data's {trainer.data.num_classes} "
                      "(its own vocabulary), so the summary does not evaluate it", stacklevel=2)
        return None
    if key is not None:
        write_entry(key, metrics, top1)
    return metrics, top1


def evaluate_teachers(trainer, split, report: str) -> dict[str, tuple[dict[str, float], Tensor]]:
    """:func:`evaluate_teacher` of every teacher model of the run, by name (a stored teacher
    has no model to evaluate); {} with ``run.evaluate_teacher = false``."""
    if not trainer.config.run.evaluate_teacher:
        return {}
    found = {name: evaluate_teacher(trainer, name, split, report)
             for name, model in trainer.teachers.items() if model is not None}
    return {name: result for name, result in found.items() if result is not None}
