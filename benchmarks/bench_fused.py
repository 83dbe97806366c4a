"""Peak memory and time of the fused vocabulary projection against the dense path (CPU).

A distillation step of ``kd`` (T = 1) between a student and a frozen teacher
given as hidden states ``[N, H]`` and linear vocabulary heads ``[H, V]``:
forward and backward, gradients to the student's hidden states and head, both
models' projections included. "dense" computes both models' logits and calls
the loss on them (the plain PyTorch way); "fused c" passes
``kdcore.Outputs(hidden, head)`` with ``chunk_size = c``.

Memory: each variant runs one step in a fresh process started with
``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB, so that glibc serves every tensor
from its own mapping and returns it to the system when it is freed; the growth
of the peak resident set (``ru_maxrss``) during the step (after a tiny warm-up
step that loads the plugins and the kernels) is then the peak of
live memory, not what the allocator keeps. It is reported in units of one
float32 ``[N, V]`` logits tensor. Time: ``--repeats`` steps of each variant in
this process (ordinary allocator), interleaved with the order alternating;
medians, and the ratio to the dense path measured in the same run.

    .venv/bin/python benchmarks/bench_fused.py [--tokens 8192] [--vocab 32000] [--hidden 256]
        [--chunks 512,256] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import kdcore


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


def child_memory(args) -> dict:
    tiny = argparse.Namespace(tokens=8, vocab=16, hidden=4)
    step(args.child if args.child == "dense" else "4", *setup(tiny))  # load plugins, warm the kernels
    inputs = setup(args)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(args.child, *inputs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"extra_logits": (peak - base) * 1024 / (args.tokens * args.vocab * 4)}


def memory(args, variant: str) -> float:
    cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens), "--vocab",
           str(args.vocab), "--hidden", str(args.hidden), "--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out)["extra_logits"]


def times(args, variants: list[str]) -> dict[str, float]:
    inputs = setup(args)
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
    ap.add_argument("--chunks", default="512,256", help="comma-separated chunk sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_memory(args)))
        return
    variants = ["dense", *args.chunks.split(",")]
    mem = {v: memory(args, v) for v in variants}
    secs = times(args, variants)
    print(f"kd forward+backward, {args.tokens} tokens x vocabulary {args.vocab} x hidden {args.hidden}, "
          f"{args.threads} thread(s), median of {args.repeats} interleaved steps")
    print(f"{'path':12}{'extra peak memory (logits tensors)':>36}{'memory / dense':>16}{'time s':>9}"
          f"{'time / dense':>14}")
    for v in variants:
        name = v if v == "dense" else f"fused {v}"
        print(f"{name:12}{mem[v]:36.3f}{mem[v] / mem['dense']:16.3f}{secs[v]:9.3f}{secs[v] / secs['dense']:14.3f}")
    print("goals for fused chunk 512: memory <= 0.3 logits tensors, time <= 1.1x dense")


if __name__ == "__main__":
    main()
