"""Images/s of a CIFAR-100 distillation step, resnet32x4 -> resnet8x4: kdcore vs a hand-written loop.

Both sides do the same work on the same batches (64 images of 3x32x32, 100 classes):
frozen teacher forward, student forward, cross-entropy + Hinton KD at T = 4, backward,
SGD step (lr 0.05, momentum 0.9, weight decay 5e-4). "kdcore" is the engine's
``Trainer.train_step`` built from a config (the same path as ``kdcore train``); the
baseline is the loop one would write by hand (F.cross_entropy + F.kl_div). The two
alternate step by step (which one goes first alternating too), so on a shared machine both
see the same load; every step is timed on its own. Reported: images/s from the median step
time of each side, the ratio kdcore / baseline of those medians, the median of the paired
per-step ratios, and the ratio of the fastest steps (target for all: <= 1.05). On CUDA,
each ``--variants`` entry (fp32, bf16 autocast, channels-last) is timed against a baseline
with the same setting.

    python benchmarks/bench_vision.py [--steps 10] [--repeats 3] [--batch 64]
        [--device cpu|cuda] [--variants fp32 bf16 bf16_cl]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from kdcore import create
from kdcore.engine import build_trainer
from kdcore.engine.batches import Batch

#: name -> (run.amp, run.channels_last)
VARIANTS = {"fp32": ("off", False), "bf16": ("bf16", False), "bf16_cl": ("bf16", True),
            "fp32_cl": ("off", True)}


def config(batch: int, device: str, amp: str, channels_last: bool, checkpoint: str) -> dict:
    return {
        "run": {"seed": 0, "epochs": 1, "batch_size": batch, "device": device, "progress": "off",
                "deterministic": False, "amp": amp, "channels_last": channels_last},
        "data": {"name": "digits"},  # only builds the trainer: the batches below are fed directly
        "teacher": {"backbone": "resnet32x4", "num_classes": 100, "checkpoint": checkpoint},
        "student": {"backbone": "resnet8x4", "num_classes": 100},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "loss": [{"name": "ce"}, {"name": "kd", "temperature": 4.0}],
    }


def run_variant(name: str, args, checkpoint: str) -> tuple[list[float], list[float]]:
    amp, channels_last = VARIANTS[name]
    trainer = build_trainer(config(args.batch, args.device, amp, channels_last, checkpoint), None, quiet=True)
    dev = trainer.device
    student = create("backbone", "resnet8x4", num_classes=100).to(dev)
    student.load_state_dict(trainer.student.state_dict())
    teacher = trainer.teacher  # frozen, eval mode, same weights for both sides
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student.to(memory_format=fmt)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    temp = 4.0

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()

    def baseline_step(x, y):
        x = x.contiguous(memory_format=fmt)
        with autocast():
            s = student(x)
            with torch.no_grad():
                t = teacher(x)
            ce = F.cross_entropy(s.float(), y)
            kd = F.kl_div(F.log_softmax(s.float() / temp, -1), F.log_softmax(t.float() / temp, -1),
                          log_target=True, reduction="batchmean") * temp * temp
            loss = ce + kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch, 3, 32, 32, generator=g).to(dev),
                torch.randint(0, 100, (args.batch,), generator=g).to(dev)) for _ in range(args.steps)]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(step, x, y) -> float:
        sync()
        t0 = time.perf_counter()
        step(x, y)
        sync()
        return time.perf_counter() - t0

    for x, y in batches[:2]:  # warm-up (allocator, cuDNN algorithm choice)
        baseline_step(x, y)
        trainer.train_step(Batch.of(x, y))
    base, ours = [], []
    for i in range(args.repeats):  # step by step, alternating which side goes first
        for j, (x, y) in enumerate(batches):
            pair = [(base, baseline_step), (ours, lambda x, y: trainer.train_step(Batch.of(x, y)))]
            for times, step in pair if (i + j) % 2 == 0 else pair[::-1]:
                times.append(timed(step, x, y))
    return base, ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                    default=None, help="default: fp32 on the CPU; fp32 bf16 bf16_cl on CUDA")
    args = ap.parse_args()
    variants = args.variants or (["fp32"] if args.device == "cpu" else ["fp32", "bf16", "bf16_cl"])
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "teacher.pt")  # random weights are fine for timing
        torch.save({"model": create("backbone", "resnet32x4", num_classes=100).state_dict()}, checkpoint)
        print(f"resnet32x4 -> resnet8x4, batch {args.batch}, device {args.device}, "
              f"{torch.get_num_threads()} threads, {args.repeats} x {args.steps} steps per side")
        print(f"{'variant':10}{'baseline img/s':>16}{'kdcore img/s':>14}{'ratio':>8}{'paired':>8}{'fastest':>9}")
        for name in variants:
            base, ours = run_variant(name, args, checkpoint)
            b, o = statistics.median(base), statistics.median(ours)
            paired = statistics.median(t / u for t, u in zip(ours, base))
            print(f"{name:10}{args.batch / b:16.1f}{args.batch / o:14.1f}{o / b:8.3f}{paired:8.3f}"
                  f"{min(ours) / min(base):9.3f}", flush=True)
    print("kdcore / hand-written step time (target <= 1.05): ratio of the median steps; paired: median "
          "of step-by-step ratios; fastest: ratio of the fastest steps")

if __name__ == "__main__":
    main()
