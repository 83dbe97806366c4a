"""ABKD: speed and memory of kdcore's ``abkd`` (and ``kd``) against plain PyTorch.

(a) Time of ``loss(student, teacher, target).backward()`` (student requires grad,
teacher does not) for the registered losses and for a straightforward PyTorch
implementation of the same formula, interleaved in the same run, median over
``--reps``; prints the ratio kdcore / plain (target <= 1.1). Plain ABKD is def. 4.1
written the usual way, ``-(p**a * q**b - a/s p**s - b/s q**s).sum(1) / (a b)``
on softmax probabilities (as the authors' code); plain KD is ``F.kl_div``.

(b) Peak extra memory of one forward + backward on ``--mem-shape`` (default
4096 x 50257, float32): each case runs in a fresh subprocess, which allocates and
touches the inputs, reads its peak resident set size (``ru_maxrss``), runs the
step and reads it again; the difference, in multiples of one logits tensor, is
what the step needed beyond the inputs (the student's ``.grad`` included).
The subprocess runs with ``MALLOC_MMAP_THRESHOLD_=1MiB``, so every tensor above
1 MiB is ``mmap``-ed and unmapped when freed and the peak RSS follows the live
tensors (glibc's adaptive threshold would keep freed chunk-sized tensors below
32 MiB resident); smaller allocations add a few MB of noise.

    .venv/bin/python benchmarks/bench_abkd.py [--shapes 4096x100,2048x32000]
        [--losses abkd,kd,abdkd] [--reps 5] [--threads N]
        [--memory] [--mem-shape 4096x50257] [--chunk-size 512]
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
import torch.nn.functional as F

import kdcore

ALPHA, BETA, T = 0.8, 0.3, 4.0


def plain_abkd(s, t, y, a=ALPHA, b=BETA, temperature=T):
    p, q = F.softmax(t / temperature, 1), F.softmax(s / temperature, 1)
    div = -(p ** a * q ** b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)).sum(1) / (a * b)
    return temperature ** 2 * div.mean()


def plain_kd(s, t, y, temperature=T):
    return F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1), log_target=True,
                    reduction="batchmean") * temperature ** 2


def plain_abdkd(s, t, y, alpha=1.0, beta=8.0, temperature=T, a=ALPHA, b=BETA):
    """The ABKD authors' ABDKD: mask-and-softmax TCKD, AB on the masked-out logits."""
    gt = torch.zeros_like(s, dtype=torch.bool).scatter_(1, y[:, None], True)
    ps, pt = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)
    bs = torch.stack([ps[gt], (ps * ~gt).sum(1)], 1)
    bt = torch.stack([pt[gt], (pt * ~gt).sum(1)], 1)
    tckd = F.kl_div(bs.log(), bt, reduction="batchmean")
    n, c = s.shape
    p = F.softmax(t[~gt].view(n, c - 1) / temperature, 1)
    q = F.softmax(s[~gt].view(n, c - 1) / temperature, 1)
    nckd = (-(p ** a * q ** b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)).sum(1) / (a * b)).mean()
    return temperature ** 2 * (alpha * tckd + beta * nckd)


PLAIN = {"abkd": plain_abkd, "kd": plain_kd, "abdkd": plain_abdkd}


def registered(name, chunk_size=None):
    kwargs = {"abkd": {"alpha": ALPHA, "beta": BETA}, "abdkd": {"ab_alpha": ALPHA, "ab_beta": BETA}}.get(name, {})
    return kdcore.create("loss", name, temperature=T, chunk_size=chunk_size, **kwargs)


def inputs(n, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    # scaled in place: no temporary raises the peak measured before a memory case
    return torch.randn(n, c, generator=g).mul_(3), torch.randn(n, c, generator=g).mul_(3), \
        torch.randint(0, c, (n,), generator=g)


def step(fn, s, t, y):
    s = s.detach().requires_grad_()
    start = time.perf_counter()
    value = fn(s, t, y)
    value.backward()
    return time.perf_counter() - start, value.item()


def time_losses(shapes, names, reps):
    print(f"(a) forward + backward, median of {reps}, {torch.get_num_threads()} thread(s)")
    print(f"{'loss':6s} {'shape':>12s} {'kdcore ms':>10s} {'plain ms':>10s} {'ratio':>6s} {'rel diff':>9s}")
    for n, c in shapes:
        s, t, y = inputs(n, c)
        for name in names:
            impls = {"kdcore": registered(name), "plain": PLAIN[name]}
            times = {k: [] for k in impls}
            values = {}
            for _ in range(reps + 1):                     # the first round warms up
                for k, fn in impls.items():
                    dt, values[k] = step(fn, s, t, y)
                    times[k].append(dt)
            ms = {k: 1e3 * statistics.median(v[1:]) for k, v in times.items()}
            diff = abs(values["kdcore"] - values["plain"]) / abs(values["plain"])
            print(f"{name:6s} {f'{n}x{c}':>12s} {ms['kdcore']:10.1f} {ms['plain']:10.1f} "
                  f"{ms['kdcore'] / ms['plain']:6.2f} {diff:9.1e}", flush=True)


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_case(name, impl, n, c, chunk_size):
    """Runs in a fresh subprocess: peak RSS increase of one step, in logits tensors."""
    s, t, y = inputs(n, c)
    s.requires_grad_()
    fn = PLAIN[name] if impl == "plain" else registered(name, chunk_size)
    before = peak_rss_bytes()
    fn(s, t, y).backward()
    return (peak_rss_bytes() - before) / (n * c * 4)


def measure_memory(names, n, c, chunk_size):
    print(f"\n(b) peak memory of forward + backward beyond the inputs, {n}x{c} float32, "
          f"in logits tensors ({n * c * 4 / 2 ** 20:.0f} MiB each)")
    # a fixed mmap threshold: glibc's adaptive one would serve freed tensors below 32 MiB
    # from the heap, which keeps them resident and inflates the peak
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    cases = [(name, impl, k) for name in names for impl, k in
             (("plain", None), ("kdcore", None), ("kdcore", chunk_size))]
    for name, impl, k in cases:
        out = subprocess.run([sys.executable, __file__, "--threads", str(torch.get_num_threads()),
                              "--_memory-case", json.dumps([name, impl, n, c, k])],
                             capture_output=True, text=True, env=env)
        result = f"{float(out.stdout):5.2f}x" if out.returncode == 0 else f"failed: {out.stderr.strip()[-200:]}"
        label = f"{impl}" + ("" if impl == "plain" else f" chunk_size={k}")
        print(f"{name:6s} {label:24s} {result}", flush=True)


def parse_shapes(text):
    return [tuple(int(x) for x in part.split("x")) for part in text.split(",") if part]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x100,2048x32000")
    ap.add_argument("--losses", default="abkd,kd")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory", action="store_true", help="also measure peak memory (b)")
    ap.add_argument("--mem-shape", default="4096x50257")
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--_memory-case", dest="memory_case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_case:
        print(memory_case(*json.loads(args.memory_case)))
        return
    names = args.losses.split(",")
    time_losses(parse_shapes(args.shapes), names, args.reps)
    if args.memory:
        (n, c), = parse_shapes(args.mem_shape)
        measure_memory(names, n, c, args.chunk_size)


if __name__ == "__main__":
    main()
