"""The step of a two-teacher run against the one-teacher runs it combines.

Teachers A (mlp 512-512) and B (mlp 1024), student mlp 256-256, gaussian_mixture
(64 dims, 10 classes), batch 256. Timed step by step, interleaved (the order
rotates each round, so on a shared machine every variant sees the same load):

- ``one A``: ce + kd from A;  ``one B``: ce + kd from B;
- ``one A, two terms``: ce + kd from A + kd (T = 2) from A: as many terms as the
  two-teacher run, one teacher;
- ``two``: ce + kd from A + kd (T = 2) from B;
- ``forward B``: B's forward alone, under ``no_grad`` (what a second teacher adds).

Goal: ``two <= one A, two terms + forward B`` (a second teacher costs its forward
and nothing more); reported next to the sum of the one-teacher steps
(``one A + one B``). ``--clock cpu`` times this process's CPU time (steadier on
a shared machine).

    python benchmarks/bench_teachers.py [--steps 100] [--batch 256] [--device cpu] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from kdcore import create
from kdcore.engine import build_trainer

HIDDEN = {"a": [512, 512], "b": [1024]}


def _config(batch: int, device: str, checkpoints: dict[str, str], teachers: dict[str, str], loss: list) -> dict:
    """A run of ``teachers`` (name in the config -> teacher A or B) with the terms ``loss``."""
    tables = {n: {"backbone": "mlp", "hidden": HIDDEN[t], "checkpoint": checkpoints[t]} for n, t in teachers.items()}
    conf = {
        "run": {"seed": 0, "epochs": 1, "batch_size": batch, "device": device, "progress": "off",
                "deterministic": False, "evaluate_teacher": False},
        "data": {"name": "gaussian_mixture", "n": 20000, "num_classes": 10, "dim": 64},
        "student": {"backbone": "mlp", "hidden": [256, 256]},
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4},
        "loss": loss,
    }
    if len(tables) == 1:
        conf["teacher"] = next(iter(tables.values()))
    else:
        conf["teachers"] = tables
    return conf


def _variants(batch: int, device: str, checkpoints: dict[str, str]) -> dict:
    ce, kd = {"name": "ce"}, {"name": "kd", "temperature": 4.0}
    kd2 = {"name": "kd", "temperature": 2.0, "id": "kd2"}
    return {
        "one A": _config(batch, device, checkpoints, {"t": "a"}, [ce, kd]),
        "one B": _config(batch, device, checkpoints, {"t": "b"}, [ce, kd]),
        "one A, two terms": _config(batch, device, checkpoints, {"t": "a"}, [ce, kd, kd2]),
        "two": _config(batch, device, checkpoints, {"a": "a", "b": "b"},
                       [ce, {**kd, "teacher": "a"}, {**kd2, "teacher": "b"}]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    checkpoints = {}
    for name, hidden in HIDDEN.items():  # random weights are fine for timing
        t = create("backbone", "mlp", num_classes=10, in_features=64, hidden=hidden)
        checkpoints[name] = os.path.join(tmp, f"{name}.pt")
        torch.save({"model": t.state_dict()}, checkpoints[name])
    variants = _variants(args.batch, args.device, checkpoints)
    trainers = {k: build_trainer(c, None, quiet=True) for k, c in variants.items()}
    teacher_b = trainers["one B"].teacher
    first = trainers["two"]
    batches = list(first.batches.epoch(torch.Generator().manual_seed(0)))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    sync = torch.cuda.synchronize if first.device.type == "cuda" else (lambda: None)

    def forward_b(batch):
        with torch.no_grad():
            teacher_b(batch.inputs)

    work = {**{k: t.train_step for k, t in trainers.items()}, "forward B": forward_b}
    times: dict[str, list[float]] = {k: [] for k in work}
    names = list(work)
    for i in range(args.steps + 5):
        batch = batches[i % len(batches)]
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            sync()
            t0 = clock()
            work[name](batch)
            sync()
            if i >= 5:  # warm-up steps are not timed
                times[name].append(clock() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"device {first.device}, batch {args.batch}, {args.steps} steps, clock {args.clock}; median ms per step:")
    for k, v in med.items():
        print(f"  {k:18s} {v:8.3f}")
    goal = med["one A, two terms"] + med["forward B"]
    print(f"two / (one A, two terms + forward B) = {med['two'] / goal:.3f}  (goal <= 1)")
    print(f"two / (one A + one B)                 = {med['two'] / (med['one A'] + med['one B']):.3f}")


if __name__ == "__main__":
    main()
