"""Time of a cross-batch weighting training step against a plain fixed-weight KD step.

Both run through the engine (``Trainer.train_step``, the path of ``kdcore train``)
on the same student, teacher, batches and SGD optimizer, with ``ce + kd`` (T=4):

* ``fixed weights``: teacher forward, student forward, ``ce + kd``, one backward, step;
* ``crossbatch every=k``: on a recompute step the per-term gradients of CE and KD
  (two backwards), the auxiliary batch's CE loss and its gradient (one more
  forward and backward; the engine computes only the terms a scheduler asks
  for, so no teacher forward on the auxiliary batch), the eq. 5-11 update
  written into ``.grad``, step; on the other steps one backward of
  ``sum_i c_i L_i`` with the cached coefficients.

Prints the median time per step over interleaved repetitions and the ratio to
the fixed-weight step (targets: every=1 <= 2.5x, every=10 <= 1.3x).

    .venv/bin/python benchmarks/bench_schedulers.py [--device cpu] [--threads N]
        [--batch 128] [--width 512] [--classes 100] [--steps 20] [--reps 7]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time

import torch

import kdcore
from kdcore.engine import build_trainer
from kdcore.engine.batches import Batch


def config(args, weighting: dict | None, checkpoint: str) -> dict:
    conf = {
        "run": {"seed": 0, "epochs": 1, "batch_size": args.batch, "device": args.device, "progress": "off"},
        "data": {"name": "gaussian_mixture", "n": 2000, "num_classes": args.classes, "dim": args.features},
        "teacher": {"backbone": "mlp", "hidden": [2 * args.width] * 4, "checkpoint": checkpoint},
        "student": {"backbone": "mlp", "hidden": [args.width] * 3},
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "loss": [{"name": "ce"}, {"name": "kd", "temperature": 4.0}],
    }
    if weighting is not None:
        conf["weighting"] = weighting
    return conf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    if args.steps % 10:
        ap.error("--steps must be a multiple of 10 (so every=10 recomputes in its true share of steps)")
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp()
    checkpoint = os.path.join(tmp, "teacher.pt")
    teacher = kdcore.create("backbone", "mlp", num_classes=args.classes, in_features=args.features,
                            hidden=[2 * args.width] * 4)
    torch.save({"model": teacher.state_dict()}, checkpoint)
    cases = {
        "fixed weights": None,
        "crossbatch every=1": {"name": "crossbatch", "every": 1},
        "crossbatch every=10": {"name": "crossbatch", "every": 10},
    }
    trainers = {name: build_trainer(config(args, w, checkpoint), None, quiet=True) for name, w in cases.items()}
    first = next(iter(trainers.values()))
    dev = first.device
    g = torch.Generator().manual_seed(1)
    n = first.data.train.inputs.shape[0]
    batches = []
    for _ in range(8):
        idx = torch.randint(0, n, (args.batch,), generator=g)
        batches.append((first.data.train.inputs[idx].to(dev), first.data.train.targets[idx].to(dev)))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run(trainer, steps):
        aux = itertools.cycle([Batch.of(x, y) for x, y in batches[3:] + batches[:3]])
        trainer.step += -trainer.step % 10  # start on a recomputation step of every=10
        for k in range(steps):
            x, y = batches[k % len(batches)]
            trainer.train_step(Batch.of(x, y), None, aux)

    for trainer in trainers.values():  # warm-up
        run(trainer, 10)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for rep in range(args.reps):
        order = list(trainers.items())
        for name, trainer in order if rep % 2 == 0 else order[::-1]:
            sync()
            t0 = time.perf_counter()
            run(trainer, args.steps)
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps)
    n_params = sum(p.numel() for p in first.params)
    print(f"device={dev} threads={torch.get_num_threads()} batch={args.batch} "
          f"student params={n_params} steps={args.steps} reps={args.reps}")
    base, base_min = statistics.median(times["fixed weights"]), min(times["fixed weights"])
    targets = {"crossbatch every=1": 2.5, "crossbatch every=10": 1.3}
    for name, ts in times.items():
        med = statistics.median(ts)
        target = f"  (target <= {targets[name]}x)" if name in targets else ""
        print(f"{name:22s} {1e3 * med:8.2f} ms/step   ratio {med / base:5.2f}x "
              f"(fastest repeats {min(ts) / base_min:5.2f}x){target}")


if __name__ == "__main__":
    main()
