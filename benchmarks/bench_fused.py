"""Peak memory and time of the fused vocabulary projection against the dense path (CPU).

A distillation loss ``kd`` (T = 1) between a student and a frozen teacher given
as hidden states ``[N, H]`` and linear vocabulary heads ``[H, V]``: forward and
backward, gradients to the student's hidden states and head. "dense" computes
both models' logits and calls the loss on them (the plain PyTorch way); "fused"
passes ``kdcore.Outputs(hidden, head)`` with ``chunk_size``. Each variant runs
in a fresh process; its extra peak memory is the growth of the resident set
(``ru_maxrss``) during the step, reported in units of one float32 ``[N, V]``
logits tensor. Times: the median of ``--repeats`` steps in that process.

    python benchmarks/bench_fused.py [--tokens 8192] [--vocab 32000] [--hidden 256] [--chunk 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def step(args, variant: str) -> dict:
    import torch

    import kdcore

    torch.manual_seed(0)
    n, v, h = args.tokens, args.vocab, args.hidden
    hs = torch.randn(n, h)
    ht = torch.randn(n, h)
    s_head = torch.nn.Linear(h, v, bias=False)
    t_head = torch.nn.Linear(h, v, bias=False).requires_grad_(False)
    target = torch.randint(0, v, (n,))
    loss = kdcore.create("loss", "kd", temperature=1.0, chunk_size=args.chunk if variant == "fused" else None)
    times = []
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.repeats):
        s_h = hs.clone().requires_grad_()
        s_head.weight.grad = None
        t0 = time.perf_counter()
        if variant == "fused":
            value = loss(kdcore.Outputs(hidden=s_h, head=s_head), kdcore.Outputs(hidden=ht, head=t_head), target)
        else:
            with torch.no_grad():
                t_logits = t_head(ht)
            value = loss(s_head(s_h), t_logits, target)
        value.backward()
        times.append(time.perf_counter() - t0)
        del value
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    logits_bytes = n * v * 4
    return {"variant": variant, "extra_logits": (peak - base) * 1024 / logits_bytes,
            "time_s": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=["dense", "fused"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(step(args, args.child)))
        return
    rows = {}
    for variant in ("fused", "dense"):
        cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens), "--vocab",
               str(args.vocab), "--hidden", str(args.hidden), "--chunk", str(args.chunk), "--repeats",
               str(args.repeats)]
        rows[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(f"kd forward+backward, {args.tokens} tokens x vocabulary {args.vocab} x hidden {args.hidden}, "
          f"chunk_size {args.chunk}")
    print(f"{'path':8}{'extra peak memory (logits tensors)':>38}{'time s':>10}")
    for r in rows.values():
        print(f"{r['variant']:8}{r['extra_logits']:38.2f}{r['time_s']:10.3f}")
    d, f = rows["dense"], rows["fused"]
    print(f"fused / dense: memory {f['extra_logits'] / max(d['extra_logits'], 1e-9):.3f}x, "
          f"time {f['time_s'] / d['time_s']:.3f}x (goals: memory <= 0.3 logits tensors, time <= 1.1x)")


if __name__ == "__main__":
    main()
