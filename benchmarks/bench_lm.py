"""Peak memory and time of a language-model distillation step: fused kd / jsd against full logits (CPU).

One step of a tiny Llama-style student (kdcore-lm's ``hf`` backbone, random
weights) distilling from a frozen tiny Llama teacher with a large vocabulary:
teacher forward (no gradient), student forward and backward, with
``ce + kd`` where kd uses the KL (``kl``) or kdcore-divergences' ``jsd``.
"dense" computes both models' ``[B, T, V]`` logits and calls the losses on them
(the plain way); "fused c" hands the losses ``kdcore.Outputs(hidden, head)`` with
``chunk_size = c`` (docs/fused.md), so no full logits tensor exists.

Memory: each variant runs one step in a fresh process with
``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB (every tensor its own mapping,
returned when freed); the growth of the peak resident set during the step,
after a warm-up step on a tiny input, is the peak of live memory, reported in
MiB and in units of one float32 ``[B*T, V]`` logits tensor. Time: ``--repeats``
steps of every variant in this process, interleaved with the order
alternating; medians, and the ratio to the dense step of the same divergence.

    .venv/bin/python benchmarks/bench_lm.py [--vocab 32000] [--hidden 64] [--seq 128] [--batch 8]
        [--chunk 128] [--divergences kl,jsd] [--repeats 3] [--threads 1]
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


def models(args):
    base = {"model_type": "llama", "hidden_size": args.hidden, "intermediate_size": 2 * args.hidden,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    torch.manual_seed(0)
    teacher = kdcore.create("backbone", "hf", num_classes=args.vocab, in_features=args.seq, config=base,
                            fused=True).eval().requires_grad_(False)
    student = kdcore.create("backbone", "hf", num_classes=args.vocab, in_features=args.seq,
                            config={**base, "num_hidden_layers": 1}, fused=True)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    return student, teacher, {"input_ids": ids[:, :-1]}, ids[:, 1:].contiguous()


def step(variant: str, divergence: str, chunk: int, student, teacher, inputs, target) -> None:
    """One forward + backward of ``ce + kd``; ``variant`` is "dense" or "fused"."""
    student.zero_grad(set_to_none=True)
    fused = variant == "fused"
    ce = kdcore.create("loss", "ce", **({"chunk_size": chunk} if fused else {}))
    kd = kdcore.create("loss", "kd", divergence=divergence, **({"chunk_size": chunk} if fused else {}))
    with torch.no_grad():
        t = teacher(**inputs)
    s = student(**inputs)
    if not fused:
        s, t = s.logits, t.logits
    (ce(s, None, target) + kd(s, t, target)).backward()


def child_memory(args) -> dict:
    tiny = argparse.Namespace(**{**vars(args), "vocab": 64, "seq": 8, "batch": 2})
    step(args.child, args.divergence, 16, *models(tiny))  # load plugins, warm the kernels
    inputs = models(args)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(args.child, args.divergence, args.chunk, *inputs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    extra = (peak - base) * 1024
    return {"mib": extra / 2 ** 20, "logits": extra / (args.batch * args.seq * args.vocab * 4)}


def memory(args, variant: str, divergence: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--divergence", divergence]
    for key in ("vocab", "hidden", "seq", "batch", "chunk", "threads"):
        cmd += [f"--{key}", str(getattr(args, key))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)


def times(args, cases: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
    inputs = models(args)
    runs: dict[tuple[str, str], list[float]] = {c: [] for c in cases}
    for rep in range(args.repeats):
        for case in cases if rep % 2 == 0 else cases[::-1]:
            t0 = time.perf_counter()
            step(case[0], case[1], args.chunk, *inputs)
            runs[case].append(time.perf_counter() - t0)
    return {c: statistics.median(r) for c, r in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--divergences", default="kl,jsd")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--divergence", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_memory(args)))
        return
    divergences = [d for d in args.divergences.split(",") if d in kdcore.available("divergence")]
    cases = [(v, d) for d in divergences for v in ("dense", "fused")]
    mem = {c: memory(args, *c) for c in cases}
    secs = times(args, cases)
    print(f"ce + kd step, tiny llama student/teacher, batch {args.batch} x seq {args.seq} x vocabulary "
          f"{args.vocab}, hidden {args.hidden}, chunk {args.chunk}, {args.threads} thread(s), "
          f"median of {args.repeats} interleaved steps")
    print(f"{'divergence':11}{'path':7}{'peak MiB':>10}{'logits tensors':>16}{'memory / dense':>16}"
          f"{'time s':>9}{'time / dense':>14}")
    for v, d in cases:
        m, dense = mem[(v, d)], mem[("dense", d)]
        print(f"{d:11}{v:7}{m['mib']:10.1f}{m['logits']:16.3f}{m['mib'] / dense['mib']:16.3f}"
              f"{secs[(v, d)]:9.3f}{secs[(v, d)] / secs[('dense', d)]:14.3f}")


if __name__ == "__main__":
    main()
