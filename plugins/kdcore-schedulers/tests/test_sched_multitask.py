"""MGDA (two-task min norm) and PCGrad against plain float64 references on hand-made vectors."""

import numpy as np
import pytest

from kdcore_schedulers import mgda_weight, pcgrad_coefficients
from kdcore_schedulers.multitask import pcgrad_orders


def gram(*vs):
    return [[float(a @ b) for b in vs] for a in vs]


@pytest.mark.parametrize("seed", range(10))
def test_mgda_is_the_min_norm_point(seed):
    r = np.random.default_rng(seed)
    g1, g2 = r.standard_normal(20), r.standard_normal(20) * r.uniform(0.1, 5)
    if seed % 2:
        g2 = g2 + 3 * g1  # aligned gradients: a vertex solution
    grid = np.linspace(0, 1, 100001)
    norms = np.linalg.norm(grid[:, None] * g1 + (1 - grid[:, None]) * g2, axis=1)
    gamma = mgda_weight(*np.array(gram(g1, g2))[[0, 0, 1], [0, 1, 1]])
    assert np.linalg.norm(gamma * g1 + (1 - gamma) * g2) <= norms.min() + 1e-12
    assert gamma == pytest.approx(grid[np.argmin(norms)], abs=1e-4)


def test_mgda_known_two_task_results():
    e = np.eye(2)
    assert mgda_weight(1.0, 0.0, 1.0) == 0.5                     # orthogonal, equal norms
    assert mgda_weight(1.0, 0.0, 4.0) == pytest.approx(0.8)     # |g2| = 2: gamma = 4 / 5
    assert mgda_weight(1.0, 2.0, 4.0) == 1.0                     # g2 = 2 g1: g1 is the min-norm point
    assert mgda_weight(4.0, 2.0, 1.0) == 0.0
    assert mgda_weight(2.0, 2.0, 2.0) == 0.5                     # equal gradients
    assert mgda_weight(0.0, 0.0, 0.0) == 0.5
    assert mgda_weight(0.0, 0.0, 1.0) == 1.0                     # a zero gradient is the min-norm point
    # opposite gradients: the min-norm point is 0
    g1, g2 = 2 * e[0], -3 * e[0]
    gamma = mgda_weight(*np.array(gram(g1, g2))[[0, 0, 1], [0, 1, 1]])
    assert np.allclose(gamma * g1 + (1 - gamma) * g2, 0)


def pcgrad_reference(grads, orders):
    """Yu et al. 2020, alg. 1, on the vectors themselves."""
    out = np.zeros_like(grads[0])
    for i, g in enumerate(grads):
        gp = g.copy()
        for j in orders[i]:
            d = gp @ grads[j]
            if d < 0:
                gp = gp - d / (grads[j] @ grads[j]) * grads[j]
        out += gp
    return out


def test_pcgrad_two_tasks_known_result():
    r = np.random.default_rng(0)
    g1 = r.standard_normal(10)
    g2 = -0.5 * g1 + r.standard_normal(10)
    d = g1 @ g2
    assert d < 0
    want = (g1 - d / (g2 @ g2) * g2) + (g2 - d / (g1 @ g1) * g1)
    coef, conflicts = pcgrad_coefficients(gram(g1, g2), [[1], [0]])
    assert conflicts == 2
    np.testing.assert_allclose(coef[0] * g1 + coef[1] * g2, want, rtol=1e-12)
    # the projected sum has no component against either gradient
    assert (coef[0] * g1 + coef[1] * g2) @ g1 >= -1e-12
    # no conflict: plain sum
    coef, conflicts = pcgrad_coefficients(gram(g1, g1 + g2 * 0.1), [[1], [0]])
    assert coef == [1.0, 1.0] and conflicts == 0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rng_seed", [None, 3])
def test_pcgrad_many_tasks_matches_reference(seed, rng_seed):
    r = np.random.default_rng(seed)
    grads = [r.standard_normal(8) for _ in range(4)]
    grads[2] = np.zeros(8) if seed == 0 else grads[2]
    orders = pcgrad_orders(4, rng_seed, step=seed)
    assert all(sorted(o) == [j for j in range(4) if j != i] for i, o in enumerate(orders))
    coef, _ = pcgrad_coefficients(gram(*grads), orders)
    np.testing.assert_allclose(sum(c * g for c, g in zip(coef, grads)), pcgrad_reference(grads, orders),
                               rtol=1e-10, atol=1e-12)


def test_pcgrad_orders():
    assert pcgrad_orders(3, None, 5) == [[1, 2], [0, 2], [0, 1]]
    assert pcgrad_orders(5, 1, 7) == pcgrad_orders(5, 1, 7)
    assert len({str(pcgrad_orders(5, 1, s)) for s in range(20)}) > 1
