"""kdcore training step vs a hand-written PyTorch loop doing the same work.

Same student, teacher, data and losses (ce + Hinton KD at T=4): the baseline is
the loop one would write by hand (F.cross_entropy + F.kl_div). The two
alternate step by step (which one goes first alternating too), so on a shared
machine both see the same load, and every step is timed on its own. Reported:
the ratio kdcore / baseline of the median steps (target: <= 1.05), the median
of the paired per-step ratios and the ratio of the fastest steps. ``--clock
cpu`` times this process's CPU time instead of wall time (steadier on a
virtual machine whose CPUs are shared).

    python benchmarks/bench_engine.py [--steps 200] [--repeats 7] [--batch 256] [--device cpu]
        [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kdcore.engine import build_trainer
from kdcore.engine.batches import Batch


def config(batch: int, device: str, hidden_t, hidden_s) -> dict:
    return {
        "run": {"seed": 0, "epochs": 1, "batch_size": batch, "device": device, "progress": "off",
                "deterministic": False},
        "data": {"name": "gaussian_mixture", "n": 20000, "num_classes": 10, "dim": 64},
        "teacher": {"backbone": "mlp", "hidden": hidden_t, "checkpoint": "__teacher__.pt"},
        "student": {"backbone": "mlp", "hidden": hidden_s},
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4},
        "loss": [{"name": "ce"}, {"name": "kd", "temperature": 4.0}],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden-teacher", type=int, nargs="+", default=[512, 512])
    ap.add_argument("--hidden-student", type=int, nargs="+", default=[256, 256])
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time (CPU device only; steadier on a shared machine)")
    args = ap.parse_args()
    import os
    import tempfile

    tmp = tempfile.mkdtemp()
    conf = config(args.batch, args.device, args.hidden_teacher, args.hidden_student)
    # a teacher checkpoint for the config (random weights are fine for timing)
    from kdcore import create

    t = create("backbone", "mlp", num_classes=10, in_features=64, hidden=args.hidden_teacher)
    ckpt = os.path.join(tmp, "t.pt")
    torch.save({"model": t.state_dict()}, ckpt)
    conf["teacher"]["checkpoint"] = ckpt
    trainer = build_trainer(conf, None, quiet=True)
    dev = trainer.device
    x_all, y_all = trainer.data.train.inputs.to(dev), trainer.data.train.targets.to(dev)
    n = x_all.shape[0]

    # the hand-written loop: its own copies of the same models and optimizer settings
    student = create("backbone", "mlp", num_classes=10, in_features=64, hidden=args.hidden_student).to(dev)
    student.load_state_dict(trainer.student.state_dict())
    teacher = trainer.teacher
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    temp = 4.0

    def baseline_step(x, y):
        s = student(x)
        with torch.no_grad():
            tl = teacher(x)
        ce = F.cross_entropy(s, y)
        kd = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(tl / temp, -1), log_target=True,
                      reduction="batchmean") * temp * temp
        loss = ce + kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def kdcore_step(x, y):
        trainer.train_step(Batch.of(x, y))

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.clock == "cpu" and dev.type != "cpu":
        ap.error("--clock cpu measures CPU time: use it with --device cpu")

    def timed(step, x, y) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        step(x, y)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return clock() - t0

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, n, (args.batch,), generator=g).to(dev) for _ in range(args.steps)]
    for idx in batches[:10]:  # warm-up
        baseline_step(x_all[idx], y_all[idx])
        kdcore_step(x_all[idx], y_all[idx])
    base, ours = [], []
    for i in range(args.repeats):  # step by step, alternating which side goes first
        for j, idx in enumerate(batches):
            x, y = x_all.index_select(0, idx), y_all.index_select(0, idx)
            pair = [(base, baseline_step), (ours, kdcore_step)]
            for times, step in pair if (i + j) % 2 == 0 else pair[::-1]:
                times.append(timed(step, x, y))
    b, o = statistics.median(base), statistics.median(ours)
    paired = statistics.median(u / v for u, v in zip(ours, base))
    print(f"device {dev}, batch {args.batch}, student {args.hidden_student}, teacher {args.hidden_teacher}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock, {args.repeats} x {args.steps} steps per side")
    print(f"{'':22}{'ms/step':>10}")
    print(f"{'hand-written loop':22}{b * 1e3:10.3f}")
    print(f"{'kdcore train_step':22}{o * 1e3:10.3f}")
    print(f"ratio kdcore / baseline: {o / b:.3f} (median steps; paired: {paired:.3f}, "
          f"fastest steps: {min(ours) / min(base):.3f})")


if __name__ == "__main__":
    main()
