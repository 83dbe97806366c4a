"""Compare loss-weight schedulers on the demo data (kdcore-schedulers).

Trains the demo teacher (an MLP on ``gaussian_mixture``), then a small student
with ``ce + kd`` (T = 4) under each weighting, over several seeds:

* fixed weights 1 + 1;
* ``distill_decay`` (cross-batch weighting paper sec. 3.3): CE 0.1 -> 1 and KD
  0.9 -> 0 by the midpoint, then a KD regulariser with beta = 0.1;
* ``crossbatch`` in ``mode="paper"`` and ``mode="align"`` (c = 0.5);
* ``mgda`` and ``pcgrad``.

Prints a table of test accuracy and total-variation distance to the exact
Bayes posterior (mean +- std over seeds) and time per run. Every run's
``metrics.jsonl`` (with the weights per epoch) is under ``--out``; plot them
with ``examples/plot_weights.py``.

    .venv/bin/python examples/schedulers_compare.py [--seeds 5] [--epochs 8] [--threads 1]
        [--out runs/schedulers_compare]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import kdcore

TEACHER: dict[str, Any] = {
    "run": {"seed": 0, "epochs": 10, "batch_size": 64, "progress": "off"},
    "data": {"name": "gaussian_mixture"},
    "student": {"backbone": "mlp", "hidden": [128, 128]},
    "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
    "loss": [{"name": "ce"}],
}

STUDENT: dict[str, Any] = {
    "run": {"seed": 1, "epochs": 8, "batch_size": 64, "progress": "off"},
    "data": {"name": "gaussian_mixture"},
    "student": {"backbone": "mlp", "hidden": [16]},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "cosine"},
    "loss": [{"name": "ce"}, {"name": "kd", "temperature": 4.0}],
}

DECAY = [
    {"name": "ce", "schedule": {"name": "distill_decay", "role": "ce"}},
    {"name": "kd", "temperature": 4.0, "schedule": {"name": "distill_decay", "role": "kd"}},
    {"name": "kd", "id": "kd_reg", "temperature": 4.0,
     "schedule": {"name": "distill_decay", "role": "reg", "beta": 0.1}},
]

#: method label -> (replacement loss list or None, [weighting] table or None)
METHODS: dict[str, tuple[list[dict[str, Any]] | None, dict[str, Any] | None]] = {
    "fixed 1 + 1": (None, None),
    "distill_decay": (DECAY, None),
    "crossbatch paper": (None, {"name": "crossbatch", "mode": "paper"}),
    "crossbatch align": (None, {"name": "crossbatch", "mode": "align"}),
    "mgda": (None, {"name": "mgda"}),
    "pcgrad": (None, {"name": "pcgrad", "seed": 0}),
}


def slug(label: str) -> str:
    return label.replace(" + ", "-").replace(" ", "-")


def student_config(teacher_ckpt: str, seed: int, epochs: int, losses, weighting) -> dict[str, Any]:
    conf = copy.deepcopy(STUDENT)
    conf["run"].update(seed=seed, epochs=epochs)
    conf["teacher"] = {"backbone": "mlp", "hidden": TEACHER["student"]["hidden"], "checkpoint": teacher_ckpt}
    if losses is not None:
        conf["loss"] = copy.deepcopy(losses)
    if weighting is not None:
        conf["weighting"] = dict(weighting)
    return conf


def mean_std(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.4f} +- {sd:.4f}"


def main() -> int:
    ap = argparse.ArgumentParser(description="compare loss-weight schedulers on the demo data")
    ap.add_argument("--seeds", type=int, default=5, help="student seeds 1..N (default 5)")
    ap.add_argument("--epochs", type=int, default=8, help="student epochs (default 8)")
    ap.add_argument("--out", default="runs/schedulers_compare")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: these models are tiny)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    missing = {"crossbatch", "distill_decay", "mgda", "pcgrad"} - set(kdcore.available("scheduler"))
    if missing:
        print(f"kdcore-schedulers is not installed (missing: {sorted(missing)})", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(f"[compare] teacher -> {out / 'teacher'}", file=sys.stderr)
    teacher = kdcore.train(copy.deepcopy(TEACHER), out / "teacher", quiet=True, overwrite=True)  # a rerun replaces its runs
    ckpt = str((out / "teacher" / "checkpoints" / "best.pt").resolve())
    rows = []
    for label, (losses, weighting) in METHODS.items():
        acc, tv, secs = [], [], []
        for seed in range(1, args.seeds + 1):
            print(f"[compare] {label}, seed {seed}", file=sys.stderr)
            t0 = time.perf_counter()
            s = kdcore.train(student_config(ckpt, seed, args.epochs, losses, weighting),
                             out / f"{slug(label)}-s{seed}", quiet=True, overwrite=True)
            secs.append(time.perf_counter() - t0)
            acc.append(s["test_acc"])
            tv.append(s["test_tv"])
        rows.append((label, mean_std(acc), mean_std(tv), statistics.mean(secs)))
    print(f"\nteacher test acc {teacher['test_acc']:.4f}; student mlp [16], {args.epochs} epochs, "
          f"{args.seeds} seeds\n")
    print("| method | test acc | TV to Bayes | s / run |\n| --- | --- | --- | --- |")
    for label, a, t, sec in rows:
        print(f"| {label} | {a} | {t} | {sec:.1f} |")
    print(f"\nruns: {out}  (plot: .venv/bin/python examples/plot_weights.py {out}/crossbatch-paper-s1 ...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
