"""Forward + backward time of the kdcore-divergences divergences against plain PyTorch.

For each divergence (``jsd``, ``skew_kl``, ``skew_rkl``, ``tvd``, ``akl``) and each
shape, times ``loss(student, teacher, None).backward()`` (student requires grad,
teacher does not) of ``kdcore.create("loss", "kd", divergence=name, temperature=1)``
(log-softmax of both models, the divergence per row, mean over rows) and of a
plain PyTorch formula of the same quantity written the way one usually writes it
(jsd: a logsumexp of the stacked weighted log-probabilities and two ``F.kl_div``;
skew: the mixture of probabilities and its log, as DistiLLM; tvd: the softmax
difference; akl: the authors' sort-and-cumsum weights and two ``F.kl_div``),
in the same run, interleaved (alternating which goes first; calls of small shapes
are timed in back-to-back groups of at least 50 ms), and prints the fastest
times, the ratio kdcore / plain of the fastest and of the median runs (on a
shared machine the fastest run is the steadier estimate), and the difference of
the values.

    .venv/bin/python benchmarks/bench_divergences.py [--shapes 4096x100,1024x32000]
        [--divergences jsd,tvd,...] [--reps 7] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

import kdcore


def plain_jsd(s, t, y, beta=0.5):
    lq, lp = F.log_softmax(s, -1), F.log_softmax(t, -1)
    lm = torch.logsumexp(torch.stack([lq + math.log(1 - beta), lp + math.log(beta)]), dim=0)
    kl_p = F.kl_div(lm, lp, reduction="none", log_target=True).sum(-1)
    kl_q = F.kl_div(lm, lq, reduction="none", log_target=True).sum(-1)
    return (beta * kl_p + (1 - beta) * kl_q).mean()


def plain_skew_kl(s, t, y, alpha=0.1):
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    lm = torch.log(alpha * p + (1 - alpha) * q)
    return F.kl_div(lm, F.log_softmax(t, -1), reduction="none", log_target=True).sum(-1).mean()


def plain_skew_rkl(s, t, y, alpha=0.1):
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    lm = torch.log(alpha * q + (1 - alpha) * p)
    return F.kl_div(lm, F.log_softmax(s, -1), reduction="none", log_target=True).sum(-1).mean()


def plain_tvd(s, t, y):
    return 0.5 * (F.softmax(t, -1) - F.softmax(s, -1)).abs().sum(-1).mean()


def plain_akl(s, t, y, mu=0.5):
    lq, lp = F.log_softmax(s, -1), F.log_softmax(t, -1)
    with torch.no_grad():
        p, q = lp.exp(), lq.exp()
        p_sorted, idx = p.sort(-1, descending=True)
        gap = (p_sorted - q.gather(-1, idx)).abs()
        tail = p_sorted.cumsum(-1) > mu
        tail[:, 0] = False
        g_head, g_tail = gap.masked_fill(tail, 0).sum(-1), gap.masked_fill(~tail, 0).sum(-1)
        w_head, w_tail = g_head / (g_head + g_tail), g_tail / (g_head + g_tail)
    fkl = F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    rkl = F.kl_div(lp, lq, reduction="none", log_target=True).sum(-1)
    return (w_head * fkl + w_tail * rkl).mean()


PLAIN = {"jsd": plain_jsd, "skew_kl": plain_skew_kl, "skew_rkl": plain_skew_rkl, "tvd": plain_tvd,
         "akl": plain_akl}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_once(fn, s, t, y, device, calls: int = 1) -> float:
    """Seconds per forward + backward, averaged over ``calls`` back-to-back calls."""
    xs = [s.detach().clone().requires_grad_(True) for _ in range(calls)]
    sync(device)
    start = time.perf_counter()
    for x in xs:
        fn(x, t, y).backward()
    sync(device)
    return (time.perf_counter() - start) / calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x100,1024x32000")
    ap.add_argument("--divergences", default=",".join(PLAIN))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [n for n in args.divergences.split(",") if n]
    missing = [n for n in names if n not in kdcore.available("divergence")]
    if missing:
        print(f"not installed (skipped): {', '.join(missing)} (pip install ./plugins/kdcore-divergences)")
        names = [n for n in names if n not in missing]
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"{args.reps} interleaved forward+backward runs each")
    print(f"{'div':8} {'shape':>12} {'kdcore ms':>10} {'plain ms':>10} {'ratio':>6} {'median':>7} {'|diff|':>9}")
    for shape in args.shapes.split(","):
        n, c = (int(v) for v in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        s = (3 * torch.randn(n, c, generator=g)).to(device)
        t = (3 * torch.randn(n, c, generator=g)).to(device)
        for name in names:
            ours = kdcore.create("loss", "kd", divergence=name, temperature=1.0)
            plain = PLAIN[name]
            diff = (ours(s, t, None) - plain(s, t, None)).abs().item()
            first = min(time_once(fn, s, t, None, device) for fn in (ours, plain))  # also the warm-up
            calls = max(1, min(50, int(0.05 / first)))  # >= 50 ms per timing: steadier on small shapes
            a, b = [], []
            for i in range(args.reps):  # interleaved, alternating which goes first
                pair = [(a, ours), (b, plain)]
                for times, fn in pair if i % 2 == 0 else pair[::-1]:
                    times.append(time_once(fn, s, t, None, device, calls))
            fa, fb = min(a), min(b)
            med = statistics.median(a) / statistics.median(b)
            print(f"{name:8} {shape:>12} {fa * 1e3:10.2f} {fb * 1e3:10.2f} {fa / fb:6.2f} {med:7.2f} {diff:9.2e}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
