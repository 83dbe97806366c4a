"""Time of a cross-batch weighting training step against a plain fixed-weight KD step.

The same student, teacher, batches and SGD optimizer; every step is written
out here the way kdcore's engine runs it through the ``kdcore.weighting``
seam (the engine is not needed):

* ``plain``: teacher forward, student forward, ``ce + kd``, one backward, step;
* ``crossbatch every=k``: on a recompute step, per-term gradients of CE and KD
  (two backwards), the auxiliary batch's term losses (student and teacher
  forward, as the engine's ``aux_losses`` computes every term) and the
  gradient of its CE term, the eq. 5-11 update written into ``.grad``, step;
  on the other steps, one backward of ``sum_i c_i L_i`` with the cached
  coefficients;
* ``crossbatch every=1, aux CE only``: the same with an auxiliary batch on
  which only the CE term is computed (no teacher forward): what a lazier
  ``aux_losses`` in the engine would cost.

Prints the median time per step over interleaved repetitions and the ratio
to ``plain`` (targets: every=1 <= 2.5x, every=10 <= 1.3x).

    .venv/bin/python benchmarks/bench_schedulers.py [--device cpu] [--threads N]
        [--batch 128] [--width 512] [--classes 100] [--steps 20] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import kdcore
from kdcore.schedule import Progress
from kdcore.weighting import GradientContext, unflatten_into


def mlp(inp: int, width: int, depth: int, out: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(inp if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


class Bench:
    def __init__(self, args):
        dev = torch.device(args.device)
        torch.manual_seed(0)
        self.student = mlp(args.features, args.width, 3, args.classes).to(dev)
        self.teacher = mlp(args.features, 2 * args.width, 4, args.classes).to(dev).eval()
        self.params = list(self.student.parameters())
        self.opt = torch.optim.SGD(self.params, lr=0.01, momentum=0.9)
        self.ce = kdcore.create("loss", "ce")
        self.kd = kdcore.create("loss", "kd", temperature=4.0)
        g = torch.Generator().manual_seed(1)
        self.batches = [(torch.randn(args.batch, args.features, generator=g).to(dev),
                         torch.randint(0, args.classes, (args.batch,), generator=g).to(dev)) for _ in range(8)]
        self.dev = dev
        self.step_no = 0

    def losses(self, x, y, terms=("ce", "kd")):
        s = self.student(x)
        out = {"ce": self.ce(s, None, y)}
        if "kd" in terms:
            with torch.no_grad():
                t = self.teacher(x)
            out["kd"] = self.kd(s, t, y)
        return out

    def batch(self, k):
        return self.batches[k % len(self.batches)]

    def plain(self):
        x, y = self.batch(self.step_no)
        total = sum(self.losses(x, y).values())
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()

    def weighted(self, sched, aux_terms=("ce", "kd")):
        x, y = self.batch(self.step_no)
        progress = Progress(1, self.step_no, 1, 10 ** 6)
        self.opt.zero_grad(set_to_none=True)
        if sched.wants_gradients(progress):
            xa, ya = self.batch(self.step_no + 3)
            ctx = GradientContext(self.losses(x, y), {"ce": "ce", "kd": "kd"}, self.params, progress,
                                  lambda: self.losses(xa, ya, aux_terms))
            unflatten_into(sched.combine(ctx).grad, self.params)
        else:
            c = sched.coefficients()
            sum(c[k] * v for k, v in self.losses(x, y).items()).backward()
        self.opt.step()

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if args.steps % 10:
        ap.error("--steps must be a multiple of 10 (so every=10 recomputes in its true share of steps)")
    if args.threads:
        torch.set_num_threads(args.threads)
    b = Bench(args)
    every1 = kdcore.create("scheduler", "crossbatch", every=1)
    every10 = kdcore.create("scheduler", "crossbatch", every=10)
    every1_ce = kdcore.create("scheduler", "crossbatch", every=1)
    cases = {
        "plain fixed-weight KD": b.plain,
        "crossbatch every=1": lambda: b.weighted(every1),
        "crossbatch every=10": lambda: b.weighted(every10),
        "crossbatch every=1, aux CE only": lambda: b.weighted(every1_ce, ("ce",)),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm-up
        for _ in range(3):
            fn()
            b.step_no += 1
    for _ in range(args.reps):
        for name, fn in cases.items():
            b.step_no += -b.step_no % 10  # start on a recomputation step of every=10
            b.sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
                b.step_no += 1
            b.sync()
            times[name].append((time.perf_counter() - t0) / args.steps)
    n_params = sum(p.numel() for p in b.params)
    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} "
          f"student params={n_params} steps={args.steps} reps={args.reps}")
    base = statistics.median(times["plain fixed-weight KD"])
    targets = {"crossbatch every=1": 2.5, "crossbatch every=10": 1.3}
    for name, ts in times.items():
        med = statistics.median(ts)
        target = f"  (target <= {targets[name]}x)" if name in targets else ""
        print(f"{name:34s} {1e3 * med:8.2f} ms/step   ratio {med / base:5.2f}x{target}")


if __name__ == "__main__":
    main()
