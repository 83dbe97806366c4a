"""crossbatch_update (cross-batch weighting paper eqs. 5-11) against plain float64 references
written here: brute-force grids for eq. 5 and for the align variant, eqs. 7-11 literally."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdcore
from kdcore_schedulers import crossbatch_update

GRID = np.linspace(0.0, 1.0, 200001)


def rand(seed, n=50):
    r = np.random.default_rng(seed)
    return r.standard_normal(n), r.standard_normal(n) * r.uniform(0.1, 10), r.standard_normal(n)


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def eq5_grid(g_ce, g_kd, G):
    """Brute force of eq. 5 on the simplex: argmin over w_ce of (g_w . G)^2."""
    u = np.array([g_ce @ G, g_kd @ G])
    obj = (u[0] * GRID + u[1] * (1 - GRID)) ** 2
    return GRID[np.argmin(obj)], obj.min()


def eqs_7_to_11(g_ce, g_kd, w_ce, c):
    """Eqs. 7-11 exactly as printed, for an interior w (both weights > 0)."""
    w_kd = 1 - w_ce
    gp_ce, gp_kd = w_ce * g_ce, w_kd * g_kd                        # eq. 7
    s = np.linalg.norm(gp_ce) + np.linalg.norm(gp_kd)
    wt_ce, wt_kd = w_ce * s / np.linalg.norm(gp_ce), w_kd * s / np.linalg.norm(gp_kd)  # eq. 8
    wf_ce, wf_kd = 1.0, wt_kd / wt_ce                              # eq. 9
    g0 = 0.5 * (g_ce + g_kd)
    g_w = wf_ce * g_ce + wf_kd * g_kd
    lam = c * np.linalg.norm(g0) / np.linalg.norm(g_w)             # eq. 10
    return wf_kd, lam, g0 + lam * g_w                               # eq. 11


def test_contract_info_keys():
    g, info = crossbatch_update(*map(t, rand(0)))
    for k in ["w_ce", "w_kd", "lam", "cos_ce_ref", "cos_kd_ref", "cos_ce_kd", "norm_ce", "norm_kd",
              "norm_ref", "norm_update", "simplex_ce", "simplex_kd", "coef_ce", "coef_kd"]:
        assert k in info and math.isfinite(info[k])
    assert info["w_ce"] == 1.0 and g.shape == (50,)


@pytest.mark.parametrize("seed", range(12))
def test_eq5_closed_form_matches_grid(seed):
    g_ce, g_kd, G = rand(seed)
    if seed % 3 == 0:  # u_ce, u_kd > 0: a boundary solution
        G = g_ce / np.linalg.norm(g_ce) + g_kd / np.linalg.norm(g_kd) + 0.05 * G
        assert (g_ce @ G) > 0 and (g_kd @ G) > 0
    w_grid, obj_grid = eq5_grid(g_ce, g_kd, G)
    _, info = crossbatch_update(t(g_ce), t(g_kd), t(G))
    u = np.array([g_ce @ G, g_kd @ G])
    w = info["simplex_ce"]
    assert info["u_ce"] == pytest.approx(u[0], rel=1e-10) and info["u_kd"] == pytest.approx(u[1], rel=1e-10)
    assert info["simplex_ce"] + info["simplex_kd"] == pytest.approx(1.0)
    assert (u[0] * w + u[1] * (1 - w)) ** 2 <= obj_grid + 1e-12 * (u @ u)
    assert w == pytest.approx(w_grid, abs=1e-5)


def test_eq5_vertices_and_ties():
    e = np.eye(3)
    # u = [1, 2]: same sign, the smaller |u| is CE -> w_ce = 1
    _, info = crossbatch_update(t(e[0]), t(2 * e[1]), t(e[0] + e[1]))
    assert info["simplex_ce"] == 1.0
    _, info = crossbatch_update(t(3 * e[0]), t(e[1]), t(e[0] + e[1]))
    assert info["simplex_ce"] == 0.0
    _, info = crossbatch_update(t(e[0]), t(e[1]), t(e[2]))  # u = 0: every w optimal
    assert info["simplex_ce"] == 0.5


@pytest.mark.parametrize("seed", range(10))
def test_paper_mode_matches_eqs_7_to_11_and_the_finding(seed):
    g_ce, g_kd, G = rand(100 + seed)
    if (g_ce @ G) * (g_kd @ G) > 0:  # make eq. 5's solution interior
        G = G - 2 * (g_kd @ G) / (g_kd @ g_kd) * g_kd
    w_ce, _ = eq5_grid(g_ce, g_kd, G)
    assert 0 < w_ce < 1
    c = [0.5, 0.1, 2.0][seed % 3]
    wf_kd, lam, g_ref = eqs_7_to_11(g_ce, g_kd, w_ce, c)
    g, info = crossbatch_update(t(g_ce), t(g_kd), t(G), c=c)
    # the finding: w_kd / w_ce = |g_ce| / |g_kd| for interior solutions
    assert wf_kd == pytest.approx(np.linalg.norm(g_ce) / np.linalg.norm(g_kd), rel=1e-9)
    assert info["w_kd"] == pytest.approx(wf_kd, rel=1e-9)
    assert info["lam"] == pytest.approx(lam, rel=1e-9)
    np.testing.assert_allclose(g.numpy(), g_ref, rtol=1e-9, atol=1e-12)
    assert info["norm_update"] == pytest.approx(np.linalg.norm(g_ref), rel=1e-9)
    assert info["cos_update_ref"] == pytest.approx(g_ref @ G / np.linalg.norm(g_ref) / np.linalg.norm(G), rel=1e-8)


def test_paper_mode_boundary_is_the_limit():
    g_ce, g_kd, G = rand(7)
    G = G + 5 * (g_ce / np.linalg.norm(g_ce) + g_kd / np.linalg.norm(g_kd))
    u = np.array([g_ce @ G, g_kd @ G])
    assert u[0] * u[1] > 0  # eq. 5 on a vertex: one weight is 0, eqs. 8-9 are 0/0 there
    g, info = crossbatch_update(t(g_ce), t(g_kd), t(G))
    vertex = 1.0 if abs(u[0]) < abs(u[1]) else 0.0
    assert info["simplex_ce"] == vertex
    eps = 1e-9
    w_near = vertex - eps if vertex == 1.0 else eps
    wf_kd, lam, g_lim = eqs_7_to_11(g_ce, g_kd, w_near, 0.5)
    assert info["w_kd"] == pytest.approx(wf_kd, rel=1e-7)
    assert info["lam"] == pytest.approx(lam, rel=1e-7)
    np.testing.assert_allclose(g.numpy(), g_lim, rtol=1e-7)
    assert all(math.isfinite(v) for v in info.values())


@pytest.mark.parametrize("rho", [-0.3, -0.9, -0.999])
@pytest.mark.parametrize("mode", ["paper", "align"])
def test_conflicting_gradients_in_float32(rho, mode):
    """Strongly conflicting g_ce, g_kd (|g_w| cancels): float32 agrees with the float64 result."""
    r = np.random.default_rng(9)
    a, b, G = r.standard_normal((3, 400))
    b = b - (a @ b) / (a @ a) * a
    g_ce = 2.0 * a / np.linalg.norm(a)
    g_kd = 0.5 * (rho * a / np.linalg.norm(a) + np.sqrt(1 - rho ** 2) * b / np.linalg.norm(b))
    g64, i64 = crossbatch_update(t(g_ce), t(g_kd), t(G), mode=mode)
    g32, i32 = crossbatch_update(*(t(v, torch.float32) for v in (g_ce, g_kd, G)), mode=mode)
    assert i32["lam"] == pytest.approx(i64["lam"], rel=1e-4)
    np.testing.assert_allclose(g32.double().numpy(), g64.numpy(), rtol=1e-4, atol=1e-5 * np.abs(g64.numpy()).max())
    if mode == "paper":
        wf_kd, lam, g_ref = eqs_7_to_11(g_ce, g_kd, 0.5, 0.5)
        assert i64["lam"] == pytest.approx(lam, rel=1e-8)
        np.testing.assert_allclose(g64.numpy(), g_ref, rtol=1e-8, atol=1e-12)


def test_paper_mode_does_not_depend_on_the_auxiliary_gradient():
    g_ce, g_kd, _ = rand(3)
    outs = [crossbatch_update(t(g_ce), t(g_kd), t(np.random.default_rng(s).standard_normal(50)))
            for s in range(6)]
    for g, info in outs[1:]:
        torch.testing.assert_close(g, outs[0][0])
        assert info["w_kd"] == outs[0][1]["w_kd"] and info["lam"] == outs[0][1]["lam"]


def align_grid(g_ce, g_kd, G):
    """Brute force of the align variant: max over w of cos(w e_ce + (1-w) e_kd, G)."""
    e_ce, e_kd = g_ce / np.linalg.norm(g_ce), g_kd / np.linalg.norm(g_kd)
    h = GRID[:, None] * e_ce + (1 - GRID[:, None]) * e_kd
    cos = h @ G / (np.linalg.norm(h, axis=1) * np.linalg.norm(G))
    return GRID[np.argmax(cos)], cos.max()


@pytest.mark.parametrize("seed", range(16))
def test_align_mode_matches_grid_then_eqs_9_to_11(seed):
    g_ce, g_kd, G = rand(200 + seed)
    if seed % 2:  # an auxiliary gradient inside the cone of g_ce, g_kd (interior optimum)
        G = G + 4 * (g_ce / np.linalg.norm(g_ce) + 0.5 * g_kd / np.linalg.norm(g_kd))
    w_grid, cos_grid = align_grid(g_ce, g_kd, G)
    g, info = crossbatch_update(t(g_ce), t(g_kd), t(G), mode="align", c=0.3)
    w = info["simplex_ce"]
    e_ce, e_kd = g_ce / np.linalg.norm(g_ce), g_kd / np.linalg.norm(g_kd)
    h = w * e_ce + (1 - w) * e_kd
    assert h @ G / np.linalg.norm(h) / np.linalg.norm(G) >= cos_grid - 1e-9
    assert w == pytest.approx(w_grid, abs=1e-4)
    if 0 < w < 1:
        wf_kd = ((1 - w) / np.linalg.norm(g_kd)) / (w / np.linalg.norm(g_ce))  # eq. 8 keeping w, eq. 9
        g0 = 0.5 * (g_ce + g_kd)
        g_w = g_ce + wf_kd * g_kd
        lam = 0.3 * np.linalg.norm(g0) / np.linalg.norm(g_w)
        assert info["w_kd"] == pytest.approx(wf_kd, rel=1e-9)
        assert info["lam"] == pytest.approx(lam, rel=1e-9)
        np.testing.assert_allclose(g.numpy(), g0 + lam * g_w, rtol=1e-9, atol=1e-12)


def test_align_vertex_is_the_kd_only_limit():
    e = np.eye(4)
    g_ce, g_kd, G = 2 * e[0] + e[2], 3 * e[1], e[1] - 0.5 * e[0]  # G favours g_kd alone
    g, info = crossbatch_update(t(g_ce), t(g_kd), t(G), mode="align")
    assert info["simplex_ce"] == 0.0 and math.isfinite(info["w_kd"])
    g0 = 0.5 * (g_ce + g_kd)
    limit = g0 + 0.5 * np.linalg.norm(g0) * g_kd / np.linalg.norm(g_kd)
    np.testing.assert_allclose(g.numpy(), limit, rtol=1e-5)


def test_align_steers_by_the_auxiliary_gradient():
    g_ce, g_kd, _ = rand(5)
    ws = {crossbatch_update(t(g_ce), t(g_kd), t(G), mode="align")[1]["w_kd"]
          for G in (g_ce + 0.3 * g_kd, g_kd + 0.3 * g_ce, g_ce + g_kd)}
    assert len(ws) == 3


@pytest.mark.parametrize("mode", ["paper", "align"])
@pytest.mark.parametrize("zero", [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)])
def test_zero_gradients_give_no_nan(mode, zero):
    vs = [t(v, torch.float32) for v in rand(11)]
    for i in zero:
        vs[i] = torch.zeros_like(vs[i])
    g, info = crossbatch_update(*vs, mode=mode)
    assert torch.isfinite(g).all() and all(math.isfinite(v) for v in info.values())
    if 0 in zero or 1 in zero:
        assert info["w_kd"] == 0.0
    if 0 in zero and 1 in zero:
        assert info["lam"] == 0.0 and float(g.abs().max()) == 0.0


@pytest.mark.parametrize("mode", ["paper", "align"])
def test_opposite_gradients(mode):
    v = t(rand(1)[0], torch.float32)
    g, info = crossbatch_update(v, -v, v, mode=mode)  # g0 = 0
    assert float(g.abs().max()) < 1e-6 and all(math.isfinite(x) for x in info.values())
    g, info = crossbatch_update(v, -2 * v, v)  # paper: w_kd = 1/2, so g_w = v - v = 0
    assert info["lam"] == 0.0 and torch.isfinite(g).all()


def test_parameter_errors():
    v = torch.ones(3)
    with pytest.raises(kdcore.ConfigError, match="mode"):
        crossbatch_update(v, v, v, mode="cagrad")
    with pytest.raises(kdcore.ConfigError, match="c"):
        crossbatch_update(v, v, v, c=-1)


scale = st.sampled_from([0.0, 1e-30, 1e-12, 1e-3, 1.0, 1e3, 1e12, 1e25])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), s=st.tuples(scale, scale, scale), mode=st.sampled_from(["paper", "align"]),
       c=st.sampled_from([0.0, 0.5, 3.0]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_finite_on_extreme_scales(seed, s, mode, c, dtype):
    vs = [torch.tensor(v * k, dtype=torch.float32).to(dtype) for v, k in zip(rand(seed, 33), s)]
    g, info = crossbatch_update(*vs, mode=mode, c=c)
    assert torch.isfinite(g).all()
    assert all(math.isfinite(v) for v in info.values()), info
    if mode == "paper" and s[0] > 0 and s[1] > 0:
        n_ce, n_kd = (float(torch.linalg.vector_norm(v.double())) for v in vs[:2])
        assert info["w_kd"] == pytest.approx(n_ce / n_kd, rel=1e-3)
