"""``kdcore ptloss-search``: the coefficient search (PTLoss paper alg. 1) from the
command line.

Teacher outputs come either from saved tensors (``--tensors FILE.pt``: a dict
with ``teacher_logits`` and ``labels``, loaded with ``weights_only=True``) or
from a run configuration (``--config RUN.toml``): the ``[teacher]`` model
(or, for a plain supervised config, the ``[student]`` one) with its
checkpoint (``--checkpoint`` overrides it) evaluated on a split of the
``[data]`` dataset. The result is written as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdcore.common.errors import ConfigError

LOGIT_KEYS = ("teacher_logits", "logits")
LABEL_KEYS = ("labels", "targets")


def add_search_command(cli: Any) -> None:
    """Add ``ptloss-search`` to the ``kdcore`` subcommands."""
    p = cli.add_parser("ptloss-search", help="choose PTLoss coefficients by the proxy-teacher search "
                                             "(PTLoss paper alg. 1, eq. 11)",
                       description=__doc__.split("\n\n", 1)[1].strip().replace("``", ""))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tensors", metavar="FILE.pt", help="saved {'teacher_logits': [N, C], 'labels': [N]}")
    src.add_argument("--config", metavar="RUN.toml", help="a run config naming the teacher and the dataset")
    p.add_argument("--checkpoint", help="teacher checkpoint (overrides the config's)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"),
                   help="dataset split to score on (default: val)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--max-samples", type=int, default=None, help="use at most this many samples (first ones)")
    p.add_argument("--orders", type=int, default=5, help="largest perturbation order N_M (default 5)")
    p.add_argument("--draws", type=int, default=100, help="random draws per order N_k (default 100)")
    p.add_argument("--space", type=float, nargs=2, default=(-1.0, 10.0), metavar=("LOW", "HIGH"),
                   help="interval of each coefficient (default -1 10)")
    p.add_argument("--per-class", action="store_true", help="draw a C x M table instead of M shared values")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="FILE.json", help="write the result here (default: stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_search_command)


def load_tensors(path: str) -> tuple[Tensor, Tensor]:
    """Teacher logits and labels from a ``.pt`` file (weights only)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--tensors: file not found: {path}")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--tensors: cannot load {path} with weights_only=True ({reason})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"--tensors: {path} must hold a dict with 'teacher_logits' and 'labels'")
    found = [next((obj[k] for k in keys if k in obj), None) for keys in (LOGIT_KEYS, LABEL_KEYS)]
    if any(not isinstance(t, Tensor) for t in found):
        raise ConfigError(f"--tensors: {path} must hold tensors under 'teacher_logits' and 'labels' "
                          f"(found keys: {', '.join(map(str, obj))})")
    return found[0], found[1]


def teacher_outputs(config_path: str, checkpoint: str | None, split: str,
                    overrides: list[str]) -> tuple[Tensor, Tensor]:
    """Run a config's teacher over a split of its dataset: ``(logits, labels)``."""
    import attrs

    from kdcore import config as cfg
    from kdcore.engine import build_model
    from kdcore.plugins import default_registry

    conf = cfg.load(config_path, overrides)
    registry = default_registry()
    section = "teacher" if conf.teacher is not None else "student"
    if checkpoint is not None:
        conf = attrs.evolve(conf, **{section: attrs.evolve(getattr(conf, section), checkpoint=checkpoint)})
    if getattr(conf, section).checkpoint is None:
        raise ConfigError(f"{section}.checkpoint: the teacher needs a checkpoint (or pass --checkpoint)")
    try:
        data = registry.create("dataset", conf.data.name, **conf.data.params)
    except ConfigError as exc:
        raise exc.with_path("data") from None
    part = getattr(data, split)
    if part is None:
        raise ConfigError(f"--split: the dataset has no {split} split")
    model = build_model(conf, section, data, registry=registry).eval()
    loader = torch.utils.data.DataLoader(part, batch_size=conf.run.eval_batch_size)
    logits, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            logits.append(model(x).float())
            labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def run_search_command(args: argparse.Namespace) -> int:
    from kdcore_ptloss.search import search

    if args.out and not Path(args.out).parent.is_dir():
        raise ConfigError(f"--out: directory not found: {Path(args.out).parent}")
    if args.tensors is not None:
        if args.checkpoint is not None or args.set:
            raise ConfigError("--checkpoint and --set go with --config, not --tensors")
        logits, labels = load_tensors(args.tensors)
    else:
        logits, labels = teacher_outputs(args.config, args.checkpoint, args.split, args.set)
    if args.max_samples is not None:
        if args.max_samples < 1:
            raise ConfigError(f"--max-samples: must be a positive integer, got {args.max_samples}")
        logits, labels = logits[:args.max_samples], labels[:args.max_samples]
    result = search(logits, labels, orders=args.orders, draws=args.draws, space=tuple(args.space),
                    per_class=args.per_class, seed=args.seed, progress=False if args.no_progress else None)
    out = result.to_dict()
    out["samples"] = int(labels.numel() - (labels == -100).sum())
    out["settings"] = {"orders": args.orders, "draws": args.draws, "space": list(args.space),
                       "per_class": args.per_class, "seed": args.seed}
    text = json.dumps(out, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        print(f"best eps {result.eps} (order {result.order}): score {result.score:.6g} "
              f"(teacher {result.teacher_score:.6g}); written to {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0
