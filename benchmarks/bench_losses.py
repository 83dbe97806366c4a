"""Forward + backward time of kdcore's logit losses against straightforward PyTorch.

For each loss (built-in ``ce``, ``kd``, ``rkd``; plugins ``dkd``, ``nkd``,
``tand``) and each shape, times ``loss(student, teacher, target).backward()``
(student requires grad, teacher does not) of the registered loss and of a plain
PyTorch implementation of the same formula written the way one usually writes
it (DKD: the authors' mask-and-softmax form; NKD: boolean-mask gather), in the
same run, interleaved (alternating which goes first; calls of small shapes are
timed in back-to-back groups of at least 50 ms), and prints the fastest times, the ratio kdcore / plain
of the fastest and of the median runs (target: <= 1.1; on a shared machine the
fastest run is the steadier estimate), and the difference of the values.

    .venv/bin/python benchmarks/bench_losses.py [--shapes 4096x100,2048x32000]
        [--losses ce,kd,...] [--reps 7] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import kdcore


def plain_ce(s, t, y):
    return F.cross_entropy(s, y)


def plain_kd(s, t, y, T=4.0):
    return F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), log_target=True,
                    reduction="batchmean") * T * T


def plain_rkd(s, t, y, T=1.0):
    return F.kl_div(F.log_softmax(t / T, 1), F.log_softmax(s / T, 1), log_target=True,
                    reduction="batchmean") * T * T


def plain_dkd(s, t, y, alpha=1.0, beta=8.0, T=4.0):
    gt = torch.zeros_like(s).scatter_(1, y[:, None], 1.0)
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="batchmean")
    nckd = F.kl_div(F.log_softmax(s / T - 1000.0 * gt, 1), F.softmax(t / T - 1000.0 * gt, 1),
                    reduction="batchmean")
    return T * T * (alpha * tckd + beta * nckd)


def plain_nkd(s, t, y, gamma=1.5, T=1.0):
    n, c = s.shape
    idx = y[:, None]
    target = -(F.softmax(t, 1).gather(1, idx) * F.log_softmax(s, 1).gather(1, idx)).mean()
    keep = torch.ones_like(s, dtype=torch.bool).scatter_(1, idx, False)
    s_nt, t_nt = s[keep].reshape(n, c - 1), t[keep].reshape(n, c - 1)
    nontarget = -(F.softmax(t_nt / T, 1) * F.log_softmax(s_nt / T, 1)).sum(1).mean()
    return target + gamma * T * T * nontarget


def plain_tand(s, t, y, alpha=1.0, beta=2.0, gamma=1.5, T=1.0):
    return plain_nkd(s, t, y, gamma, T) + plain_dkd(s, t, y, alpha, beta, T)


PLAIN = {"ce": plain_ce, "kd": plain_kd, "rkd": plain_rkd, "dkd": plain_dkd, "nkd": plain_nkd,
         "tand": plain_tand}


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
    ap.add_argument("--losses", default=",".join(PLAIN))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [n for n in args.losses.split(",") if n]
    missing = [n for n in names if n not in kdcore.available("loss")]
    if missing:
        print(f"not installed (skipped): {', '.join(missing)}")
        names = [n for n in names if n not in missing]
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"{args.reps} interleaved forward+backward runs each")
    print(f"{'loss':6} {'shape':>12} {'kdcore ms':>10} {'plain ms':>10} {'ratio':>6} {'median':>7} {'|diff|':>9}")
    for shape in args.shapes.split(","):
        n, c = (int(v) for v in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        s = (3 * torch.randn(n, c, generator=g)).to(device)
        t = (3 * torch.randn(n, c, generator=g)).to(device)
        y = torch.randint(0, c, (n,), generator=g).to(device)
        for name in names:
            ours, plain = kdcore.create("loss", name), PLAIN[name]
            diff = (ours(s, t, y) - plain(s, t, y)).abs().item()
            first = min(time_once(fn, s, t, y, device) for fn in (ours, plain))  # also the warm-up
            calls = max(1, min(50, int(0.05 / first)))  # >= 50 ms per timing: steadier on small shapes
            a, b = [], []
            for i in range(args.reps):  # interleaved, alternating which goes first
                pair = [(a, ours), (b, plain)]
                for times, fn in pair if i % 2 == 0 else pair[::-1]:
                    times.append(time_once(fn, s, t, y, device, calls))
            fa, fb = min(a), min(b)
            med = statistics.median(a) / statistics.median(b)
            print(f"{name:6} {shape:>12} {fa * 1e3:10.2f} {fb * 1e3:10.2f} {fa / fb:6.2f} {med:7.2f} {diff:9.2e}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
