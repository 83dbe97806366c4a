"""The cost of feature taps on a resnet32x4 -> resnet8x4 distillation step (CPU or CUDA).

Two engine steps (``Trainer.train_step``, the path of ``kdcore train``) on the same
batches of 64 CIFAR-shaped images, 100 classes: ce + Hinton KD (T = 4), and the same
objective where the KD term declares ``uses_outputs = True`` and taps the three stage
outputs of both models (``stages.0..2``), reading only the logits. The work is the
same; the difference is the taps (hooks registered and removed around each forward,
features kept). The two alternate step by step; reported: the ratio of the median
step times and of the fastest steps (goal <= 1.03).

    python benchmarks/bench_taps.py [--steps 10] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import kdcore
from kdcore.engine import build_trainer
from kdcore.engine.batches import Batch
from kdcore.plugins import load_registry

TAPS = ["stages.0", "stages.1", "stages.2"]


class TappedKD(torch.nn.Module):
    """Hinton KD through the outputs seam, with the three stages tapped on both sides."""

    uses_outputs = True
    student_taps = TAPS
    teacher_taps = TAPS

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.kd = kdcore.create("loss", "kd", temperature=temperature)

    def forward(self, student, teacher, target):
        assert len(student.features) == len(teacher.features) == len(TAPS)
        return self.kd(student.logits, teacher.logits, target)


class BenchPlugin:
    @kdcore.hookimpl
    def register_losses(self, register):
        register("tapped_kd", TappedKD)


def config(device: str, checkpoint: str, kd: str) -> dict:
    return {
        "run": {"seed": 0, "epochs": 1, "batch_size": 64, "device": device, "progress": "off",
                "deterministic": False},
        "data": {"name": "digits"},  # only builds the trainer: the batches below are fed directly
        "teacher": {"backbone": "resnet32x4", "num_classes": 100, "checkpoint": checkpoint},
        "student": {"backbone": "resnet8x4", "num_classes": 100},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "loss": [{"name": "ce"}, {"name": kd, "temperature": 4.0}],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    registry = load_registry(extra_plugins=[("bench_taps", BenchPlugin())])
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "teacher.pt")
        torch.save({"model": kdcore.create("backbone", "resnet32x4", num_classes=100).state_dict()}, ckpt)
        plain = build_trainer(config(args.device, ckpt, "kd"), None, quiet=True, registry=registry)
        tapped = build_trainer(config(args.device, ckpt, "tapped_kd"), None, quiet=True, registry=registry)
    tapped.student.load_state_dict(plain.student.state_dict())
    dev = plain.device
    g = torch.Generator().manual_seed(0)
    batches = [Batch.of(torch.randn(64, 3, 32, 32, generator=g).to(dev), torch.randint(0, 100, (64,), generator=g)
                        .to(dev)) for _ in range(args.steps)]

    def timed(trainer, batch) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train_step(batch)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for b in batches[:2]:  # warm-up
        timed(plain, b)
        timed(tapped, b)
    times: dict[str, list[float]] = {"plain": [], "tapped": []}
    for i in range(args.repeats):
        for j, b in enumerate(batches):
            order = [("plain", plain), ("tapped", tapped)]
            for name, trainer in order if (i + j) % 2 == 0 else order[::-1]:
                times[name].append(timed(trainer, b))
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    print(f"{'step':10}{'median ms':>12}{'fastest ms':>12}")
    for k in times:
        print(f"{k:10}{med[k] * 1e3:12.2f}{low[k] * 1e3:12.2f}")
    print(f"taps / plain: median {med['tapped'] / med['plain']:.3f}x, fastest {low['tapped'] / low['plain']:.3f}x "
          f"(goal <= 1.03)")


if __name__ == "__main__":
    main()
