"""Peak memory and time of the fused vocabulary projection against the dense path (CPU).

A distillation step of ``kd`` (T = 1) between a student and a frozen teacher
given as hidden states ``[N, H]`` and linear vocabulary heads ``[H, V]``:
forward and backward, gradients to the student's hidden states and head, both
models' projections included. "dense" computes both models' logits and calls
the loss on them (the plain PyTorch way); "fused c" passes
``kdcore.Outputs(hidden, head)`` with ``chunk_size = c``.

Memory: the step's peak tensor memory beyond what was live before it
(kdcore's ``run.measure_memory``: the PyTorch profiler's record of every
allocation and free), in units of one float32 ``[N, V]`` logits tensor. Time: ``--repeats`` steps of each variant in
this process (ordinary allocator), interleaved with the order alternating;
medians, and the ratio to the dense path measured in the same run.

    .venv/bin/python benchmarks/bench_fused.py [--tokens 8192] [--vocab 32000] [--hidden 256]
        [--chunks 512,256,128] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kdcore
from kdcore.engine.memory import MEASURED_STEP, StepMemory


def setup(args):
    torch.manual_seed(0)
    n, v, h = args.tokens, args.vocab, args.hidden
    s_head = torch.nn.Linear(h, v, bias=False)
    t_head = torch.nn.Linear(h, v, bias=False).requires_grad_(False)
    return torch.randn(n, h), torch.randn(n, h), s_head, t_head, torch.randint(0, v, (n,))


def step(variant: str, hs, ht, s_head, t_head, target) -> None:
    """One forward + backward; ``variant`` is "dense" or a chunk size."""
    s_h = hs.clone().requires_grad_()
    s_head.weight.grad = None
    if variant == "dense":
        with torch.no_grad():
            t_logits = t_head(ht)
        value = kdcore.create("loss", "kd", temperature=1.0)(s_head(s_h), t_logits, target)
    else:
        loss = kdcore.create("loss", "kd", temperature=1.0, chunk_size=int(variant))
        value = loss(kdcore.Outputs(hidden=s_h, head=s_head), kdcore.Outputs(hidden=ht, head=t_head), target)
    value.backward()


def peak_logits(variant: str, inputs, args) -> float:
    """The step's peak tensor memory beyond what was live before it (kdcore's
    ``run.measure_memory``), in logits tensors."""
    memory = StepMemory(torch.device("cpu"), enabled=True)
    with memory.around(MEASURED_STEP):
        step(variant, *inputs)
    return memory.peak_mib * 2**20 / (args.tokens * args.vocab * 4)


def times(args, variants: list[str], inputs) -> dict[str, float]:
    runs: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(args.repeats):
        for variant in variants if rep % 2 == 0 else variants[::-1]:
            t0 = time.perf_counter()
            step(variant, *inputs)
            runs[variant].append(time.perf_counter() - t0)
    return {v: statistics.median(r) for v, r in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunks", default="512,256,128", help="comma-separated chunk sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = ["dense", *args.chunks.split(",")]
    inputs = setup(args)
    step("64", *inputs)  # warm-up (the kernels)
    mem = {v: peak_logits(v, inputs, args) for v in variants}
    secs = times(args, variants, inputs)
    print(f"kd forward+backward, {args.tokens} tokens x vocabulary {args.vocab} x hidden {args.hidden}, "
          f"{args.threads} thread(s), median of {args.repeats} interleaved steps")
    print(f"{'path':12}{'extra peak memory (logits tensors)':>36}{'memory / dense':>16}{'time s':>9}"
          f"{'time / dense':>14}")
    for v in variants:
        name = v if v == "dense" else f"fused {v}"
        print(f"{name:12}{mem[v]:36.3f}{mem[v] / mem['dense']:16.3f}{secs[v]:9.3f}{secs[v] / secs['dense']:14.3f}")
    print("goals: memory <= 0.3 logits tensors, time <= 1.1x dense")


if __name__ == "__main__":
    main()
