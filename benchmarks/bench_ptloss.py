"""Benchmark of the PTLoss coefficient search (PTLoss paper alg. 1, appendix A.4).

The paper's setting: 5 orders x 100 draws scored on 1000 validation samples of
the 3-class synthetic Gaussian mixture (appendix A.5); the paper reports
"less than two minutes on CPU". Every draw needs the proxy teacher of every
sample, i.e. 500,000 small optimisation problems.

Compared in the same run, on the same teacher outputs:

- ``vectorised``: :func:`kdcore_ptloss.search` (all draws x samples in one
  batched O(C)-per-row Newton solve);
- ``per-draw loop``: the same Newton solver called once per draw;
- ``per-draw LBFGS``: the straightforward PyTorch way: for each draw, minimise
  PTLoss over free student logits (all samples at once) with torch LBFGS
  (timed on a subset of draws and extrapolated; one thread, as the solver:
  on a busy machine intra-op threads make such small ops many times slower);
- ``scipy fsolve``: the paper's method (appendix A.3), one sample at a time,
  timed on a subset and extrapolated.

Then the vectorised search with more classes (how it scales with C).

The teacher is the Bayes posterior of the mixture, sharpened and perturbed
(an over-confident teacher), so that no training is needed.

    python benchmarks/bench_ptloss.py [--classes 3 10 100] [--fsolve-samples 2000]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from kdcore.builtin.datasets import gaussian_mixture
from kdcore_ptloss import search
from kdcore_ptloss.functional import ptloss_rows
from kdcore_ptloss.proxy import single_threaded, solve
from kdcore_ptloss.search import quality_scores


def teacher_outputs(classes: int, samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    data = gaussian_mixture(num_classes=classes, n=20 * samples, seed=seed)
    g = torch.Generator().manual_seed(seed)
    post = data.val.posterior[:samples].double()
    logits = 2.5 * post.clamp_min(1e-30).log() + 0.5 * torch.randn(post.shape, generator=g, dtype=torch.float64)
    return logits.float(), data.val.targets[:samples]


def draws_table(result, classes: int, orders: int) -> torch.Tensor:
    """The search's draws as a [D, C, orders] table (zeros beyond each order)."""
    rows = []
    for d in result.scores:
        eps = torch.tensor(d.eps, dtype=torch.float64)
        eps = eps.expand(classes, d.order) if eps.dim() == 1 else eps
        rows.append(torch.nn.functional.pad(eps, (0, orders - d.order)))
    return torch.stack(rows)


def per_draw_newton(logp, labels, table) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    scores = [float(quality_scores(solve(logp, eps)[0], labels)) for eps in table]
    return time.perf_counter() - start, np.array(scores)


def per_draw_lbfgs(logp, labels, table) -> tuple[float, np.ndarray]:
    with single_threaded():  # as the solver: small ops, threads only add synchronisation
        return _per_draw_lbfgs(logp, labels, table)


def _per_draw_lbfgs(logp, labels, table) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    scores = []
    for eps in table:
        z = logp.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([z], lr=1, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = ptloss_rows(logp, torch.log_softmax(z, -1), eps).sum()
            value.backward()
            return value

        opt.step(closure)
        scores.append(float(quality_scores(torch.log_softmax(z.detach(), -1), labels)))
    return time.perf_counter() - start, np.array(scores)


def fsolve_rate(logp, table, count: int) -> float:
    """Seconds per (draw, sample) proxy with scipy.optimize.fsolve (appendix A.3:
    logit space, analytic Jacobian, teacher as the start)."""
    from scipy.optimize import fsolve

    g = np.random.default_rng(0)
    pairs = [(int(g.integers(len(table))), int(g.integers(logp.shape[0]))) for _ in range(count)]
    lp, tab = logp.numpy(), table.numpy()

    def equations(z, p, eps):          # gradient of l_PT w.r.t. the logits
        q = np.exp(z - z.max())
        q /= q.sum()
        m = np.arange(1, eps.shape[1] + 1)
        r = 1 - q
        dp = (eps * m * r[:, None] ** (m - 1)).sum(1)
        d2p = (eps * m * (m - 1) * r[:, None] ** np.maximum(m - 2, 0)).sum(1)
        a = -p / q - p * dp                                   # d l / d q
        jac_q = np.diag(q) - np.outer(q, q)
        return jac_q @ a, (jac_q, a, p / q ** 2 + p * d2p, q)

    def fprime(z, p, eps):             # Hessian: J diag(d2l/dq2) J + sum_c (dl/dq_c) d2q_c/dz2
        _, (jac_q, a, h_q, q) = equations(z, p, eps)
        u = q * a
        s = u.sum()
        second = np.diag(u - s * q) - np.outer(u, q) - np.outer(q, u) + 2 * s * np.outer(q, q)
        return jac_q @ np.diag(h_q) @ jac_q + second

    start = time.perf_counter()
    for d, n in pairs:
        p = np.exp(lp[n])
        fsolve(lambda z: equations(z, p, tab[d])[0], lp[n], fprime=lambda z: fprime(z, p, tab[d]))
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--orders", type=int, default=5)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--classes", type=int, nargs="*", default=[10, 100], help="extra class counts to scale to")
    parser.add_argument("--fsolve-samples", type=int, default=2000)
    parser.add_argument("--lbfgs-draws", type=int, default=50,
                        help="draws timed with the LBFGS loop (extrapolated to all; 0 to skip)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    logits, labels = teacher_outputs(3, args.samples)
    search(logits[:10], labels[:10], orders=1, draws=2, progress=False)  # warm-up
    start = time.perf_counter()
    result = search(logits, labels, orders=args.orders, draws=args.draws, progress=False)
    vec = time.perf_counter() - start
    problems = args.orders * args.draws * args.samples
    print(f"\nC=3, {args.orders} orders x {args.draws} draws x {args.samples} samples = {problems} proxies")
    print(f"  vectorised search        {vec:8.2f} s   best eps {np.round(result.eps, 3).tolist()} "
          f"(order {result.order}), Q {result.score:.4f} (teacher {result.teacher_score:.4f})")
    table = draws_table(result, 3, args.orders)
    logp = torch.log_softmax(logits.double(), -1)
    mine = np.array([d.score for d in result.scores])
    loop, loop_scores = per_draw_newton(logp, labels, table)
    print(f"  per-draw loop (Newton)   {loop:8.2f} s   x{loop / vec:.1f} slower, "
          f"max |dQ| {np.abs(loop_scores - mine).max():.1e}")
    if args.lbfgs_draws:
        pick = torch.linspace(0, len(table) - 1, min(args.lbfgs_draws, len(table))).long()
        lb, lb_scores = per_draw_lbfgs(logp, labels, table[pick])
        lb *= len(table) / len(pick)
        print(f"  per-draw loop (LBFGS)    {lb:8.2f} s   x{lb / vec:.1f} slower, "
              f"max |dQ| {np.abs(lb_scores - mine[pick.numpy()]).max():.1e} "
              f"(extrapolated from {len(pick)} draws)")
    if args.fsolve_samples:
        rate = fsolve_rate(logp, table, args.fsolve_samples)
        print(f"  scipy fsolve per sample  {rate * problems:8.1f} s   x{rate * problems / vec:.0f} slower "
              f"(extrapolated from {args.fsolve_samples} proxies, {rate * 1e6:.0f} us each)")

    for classes in args.classes:
        for per_class in (False, True):
            lg, lb_ = teacher_outputs(classes, args.samples)
            start = time.perf_counter()
            r = search(lg, lb_, orders=args.orders, draws=args.draws, per_class=per_class, progress=False)
            took = time.perf_counter() - start
            print(f"\nC={classes}{' per-class' if per_class else ''}: vectorised search {took:.2f} s "
                  f"(x{took / vec:.1f} the C=3 time), Q {r.score:.4f} (teacher {r.teacher_score:.4f}), "
                  f"converged {min(d.converged for d in r.scores):.3f}")


if __name__ == "__main__":
    main()
