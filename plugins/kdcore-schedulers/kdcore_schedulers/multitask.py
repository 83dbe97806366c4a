"""Multi-task gradient combinations used as KD baselines (cross-batch weighting paper sec. 3.3).

Both work on the Gram matrix ``K[i][j] = g_i . g_j`` of the task gradients
and return coefficients ``beta`` such that the update is ``sum_i beta_i g_i``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def mgda_weight(k11: float, k12: float, k22: float) -> float:
    """Two-task min-norm weight (Sener & Koltun 2018, alg. 1; Desideri 2012):
    ``gamma = argmin_{gamma in [0, 1]} |gamma g1 + (1 - gamma) g2|^2``
    ``= clip((g2 - g1) . g2 / |g1 - g2|^2, 0, 1)``; ``1/2`` when ``g1 = g2``."""
    den = k11 - 2.0 * k12 + k22
    if not den > 1e-12 * max(k11 + k22, 1e-300):
        return 0.5
    return min(max((k22 - k12) / den, 0.0), 1.0)


def pcgrad_coefficients(gram: Sequence[Sequence[float]], orders: Sequence[Sequence[int]]
                        ) -> tuple[list[float], int]:
    """PCGrad (Yu et al. 2020, alg. 1) as coefficients of the original gradients.

    For each task ``i``, ``g_i^PC`` starts at ``g_i`` and, for ``j`` in
    ``orders[i]`` (the other tasks), loses its component along ``g_j`` when
    ``g_i^PC . g_j < 0``: ``g_i^PC -= (g_i^PC . g_j) / |g_j|^2 g_j``. Tracking
    ``g_i^PC = sum_k A[i][k] g_k`` needs only the Gram matrix. The update is
    ``sum_i g_i^PC = sum_k (sum_i A[i][k]) g_k``; returns those coefficients
    and the number of projections made.
    """
    n = len(gram)
    total = [0.0] * n
    conflicts = 0
    for i in range(n):
        a = [0.0] * n
        a[i] = 1.0
        for j in orders[i]:
            dot = sum(a[k] * gram[k][j] for k in range(n))
            if dot < 0.0 and gram[j][j] > 0.0:
                a[j] -= dot / gram[j][j]
                conflicts += 1
        for k in range(n):
            total[k] += a[k]
    return total, conflicts


def pcgrad_orders(n: int, seed: int | None, step: int) -> list[list[int]]:
    """For each task, the other tasks in projection order: ascending when
    ``seed`` is None, else shuffled by a generator seeded from ``(seed, step)``
    (the same on every rank and after a resume)."""
    orders = [[j for j in range(n) if j != i] for i in range(n)]
    if seed is not None:
        rng = random.Random(f"pcgrad:{seed}:{step}")
        for order in orders:
            rng.shuffle(order)
    return orders
