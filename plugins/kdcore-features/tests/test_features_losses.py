"""Each feature loss against a float64 reference written here from the paper's equation
(explicit loops and elementary operations, never the implementation's helpers), on
random features; gradients; connectors; CRD's bank; USKD without a teacher."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kdcore
from kdcore_features import AT, CRD, PKT, SP, USKD, VID, FitNet, Relational, ReviewKD

D = torch.float64


def outs(feats: dict, logits=None, index=None):
    n = next(iter(feats.values())).shape[0]
    return kdcore.Outputs(logits if logits is not None else torch.zeros(n, 3, dtype=D), features=feats, index=index)


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D)


def block_mean(f, h, w):
    """Average pooling of [N, C, H, W] to (h, w) when H, W are multiples of h, w."""
    n, c, hh, ww = f.shape
    return f.reshape(n, c, h, hh // h, w, ww // w).mean((3, 5))


def bn_train(x, bn):
    mean = x.mean((0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean((0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def conv1x1(x, w):
    return torch.einsum("nchw,oc->nohw", x, w[:, :, 0, 0])


# -- fitnet ----------------------------------------------------------------------------------------
def test_fitnet_equals_hint_loss_with_its_regressor():
    fs, ft = rand(5, 4, 6, 6, seed=1), rand(5, 7, 6, 6, seed=2)
    loss = FitNet("s", "t")
    value = loss(outs({"s": fs}), outs({"t": ft}))
    reg = loss.regressors[0]
    assert isinstance(reg.conv, nn.Conv2d) and reg.conv.kernel_size == (1, 1)  # mdistiller ConvReg, equal sizes
    r = conv1x1(fs, reg.conv.weight.detach()) + reg.conv.bias.detach().view(1, -1, 1, 1)
    r = torch.clamp(bn_train(r, reg.bn), min=0)
    ref = ((r - ft) ** 2).sum() / ft.numel()
    assert torch.allclose(value, ref, rtol=1e-10, atol=1e-12)


def test_fitnet_regressor_kinds_and_shape_errors():
    cases = [((2, 3, 8, 8), (2, 5, 4, 4), nn.Conv2d, (3, 3)), ((2, 3, 4, 4), (2, 5, 8, 8), nn.ConvTranspose2d, (4, 4)),
             ((2, 3, 6, 6), (2, 5, 4, 4), nn.Conv2d, (3, 3))]
    for s, t, kind, k in cases:
        loss = FitNet("s", "t")
        loss(outs({"s": rand(*s)}), outs({"t": rand(*t)}))
        assert isinstance(loss.regressors[0].conv, kind) and loss.regressors[0].conv.kernel_size == k
    with pytest.raises(ValueError, match=r"fitnet.*\(2, 3, 3, 3\).*\(2, 5, 7, 7\)"):
        FitNet("s", "t")(outs({"s": rand(2, 3, 3, 3)}), outs({"t": rand(2, 5, 7, 7)}))
    lin = FitNet("s", "t")
    fs, ft = rand(4, 6), rand(4, 9, seed=3)
    v = lin(outs({"s": fs}), outs({"t": ft}))
    w, b = lin.regressors[0].weight.detach(), lin.regressors[0].bias.detach()
    assert torch.allclose(v, ((fs @ w.t() + b - ft) ** 2).mean())


# -- at ----------------------------------------------------------------------------------------------
def at_reference(pairs, p=2):
    total = 0.0
    for fs, ft in pairs:
        hs, ht = fs.shape[-1], ft.shape[-1]
        if hs > ht:
            fs = block_mean(fs, ht, ht)
        elif ht > hs:
            ft = block_mean(ft, hs, hs)
        n = fs.shape[0]
        per = 0.0
        for i in range(n):
            qs = (fs[i] ** p).sum(0).flatten() / fs.shape[1]
            qt = (ft[i] ** p).sum(0).flatten() / ft.shape[1]
            qs, qt = qs / math.sqrt(float((qs ** 2).sum())), qt / math.sqrt(float((qt ** 2).sum()))
            per = per + ((qs - qt) ** 2).sum()
        total = total + per / (n * qs.numel())
    return total


def test_at_matches_reference_over_stages_with_pooling():
    s = [rand(4, 3, 8, 8, seed=1), rand(4, 5, 4, 4, seed=2), rand(4, 2, 2, 2, seed=3)]
    t = [rand(4, 6, 8, 8, seed=4), rand(4, 7, 8, 8, seed=5), rand(4, 3, 1, 1, seed=6)]
    loss = AT(["a", "b", "c"], ["x", "y", "z"])
    value = loss(outs(dict(zip("abc", s))), outs(dict(zip("xyz", t))))
    assert torch.allclose(value, at_reference(list(zip(s, t))), rtol=1e-10)


def test_at_shape_error_names_loss_and_shapes():
    with pytest.raises(ValueError, match=r"at.*\(2, 3, 4\).*\(2, 3, 4, 4\)"):
        AT("a", "b")(outs({"a": rand(2, 3, 4)}), outs({"b": rand(2, 3, 4, 4)}))


# -- sp ----------------------------------------------------------------------------------------------
def test_sp_matches_reference():
    fs, ft = rand(6, 3, 4, 4, seed=1), rand(6, 5, 2, 2, seed=2)
    value = SP("s", "t")(outs({"s": fs}), outs({"t": ft}))
    n = 6

    def gram(f):
        f = f.reshape(n, -1)
        g = torch.tensor([[float((f[i] * f[j]).sum()) for j in range(n)] for i in range(n)], dtype=D)
        return torch.stack([row / math.sqrt(float((row ** 2).sum())) for row in g])

    ref = ((gram(fs) - gram(ft)) ** 2).sum() / n ** 2
    assert torch.allclose(value, ref, rtol=1e-10)


# -- pkt ---------------------------------------------------------------------------------------------
def pkt_reference(fs, ft, eps=1e-7):
    n = fs.shape[0]

    def cond(f):
        k = [[(float((f[i] * f[j]).sum()) / ((math.sqrt(float((f[i] ** 2).sum())) + eps)
              * (math.sqrt(float((f[j] ** 2).sum())) + eps)) + 1) / 2 for j in range(n)] for i in range(n)]
        return [[k[i][j] / sum(k[i]) for j in range(n)] for i in range(n)]

    ps, pt = cond(fs), cond(ft)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(n) for j in range(n)) / n ** 2


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 7))
def test_pkt_matches_reference(seed, n):
    fs, ft = rand(n, 5, seed=seed), rand(n, 8, seed=seed + 1)
    value = PKT("s", "t")(outs({"s": fs}), outs({"t": ft}))
    assert math.isclose(float(value), pkt_reference(fs, ft), rel_tol=1e-9, abs_tol=1e-15)


def test_pkt_pools_maps_to_vectors():
    fs, ft = rand(4, 5, 3, 3, seed=1), rand(4, 6, 2, 2, seed=2)
    value = PKT("s", "t")(outs({"s": fs}), outs({"t": ft}))
    assert math.isclose(float(value), pkt_reference(fs.mean((2, 3)), ft.mean((2, 3))), rel_tol=1e-9)


# -- relational (RKD) --------------------------------------------------------------------------------
def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def rkd_reference(fs, ft, wd=25.0, wa=50.0):
    n = fs.shape[0]

    def dist(f):
        d = [[math.sqrt(float(((f[i] - f[j]) ** 2).sum())) if i != j else 0.0 for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[d[i][j] / mu for j in range(n)] for i in range(n)]

    def angles(f):
        out = {}
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    a, b = f[j] - f[i], f[k] - f[i]
                    na, nb = math.sqrt(float((a ** 2).sum())), math.sqrt(float((b ** 2).sum()))
                    out[i, j, k] = float((a * b).sum()) / (na * nb) if na > 0 and nb > 0 else 0.0
        return out

    ds, dt = dist(fs), dist(ft)
    ld = sum(huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n ** 2
    as_, at = angles(fs), angles(ft)
    la = sum(huber(as_[key] - at[key]) for key in as_) / n ** 3
    return wd * ld + wa * la


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 6), st.floats(0.1, 3.0))
def test_relational_matches_reference(seed, n, scale):
    fs, ft = rand(n, 4, seed=seed) * scale, rand(n, 6, seed=seed + 7)
    value = Relational("s", "t")(outs({"s": fs}), outs({"t": ft}))
    assert math.isclose(float(value), rkd_reference(fs, ft), rel_tol=1e-8, abs_tol=1e-12)


def test_relational_is_registered_under_its_own_name():
    assert isinstance(kdcore.create("loss", "relational"), Relational)
    assert not isinstance(kdcore.create("loss", "rkd"), Relational)  # the core's reverse KL


# -- vid ---------------------------------------------------------------------------------------------
def test_vid_matches_gaussian_nll():
    s = [rand(3, 4, 4, 4, seed=1), rand(3, 2, 4, 4, seed=2)]
    t = [rand(3, 5, 2, 2, seed=3), rand(3, 3, 4, 4, seed=4)]
    loss = VID(["a", "b"], ["x", "y"])
    value = loss(outs({"a": s[0], "b": s[1]}), outs({"x": t[0], "y": t[1]}))
    ref = 0.0
    for reg, alpha, fs, ft in zip(loss.regressors, loss.log_scales, s, t):
        if fs.shape[-1] > ft.shape[-1]:
            fs = block_mean(fs, ft.shape[-2], ft.shape[-1])
        w = [m.weight.detach() for m in reg if isinstance(m, nn.Conv2d)]
        mu = conv1x1(torch.clamp(conv1x1(torch.clamp(conv1x1(fs, w[0]), min=0), w[1]), min=0), w[2])
        var = torch.log1p(torch.exp(alpha.detach())) + 1e-5
        nll = 0.5 * ((mu - ft) ** 2 / var.view(1, -1, 1, 1) + torch.log(var).view(1, -1, 1, 1))
        ref = ref + nll.sum() / nll.numel()
        assert torch.allclose(var, torch.full_like(var, 5.0))  # init_pred_var
    assert torch.allclose(value, ref, rtol=1e-10)


# -- crd ---------------------------------------------------------------------------------------------
def make_crd(n_data=20, k=7, dim_s=5, dim_t=6):
    torch.manual_seed(0)
    loss = CRD("s", "t", num_data=n_data, embed_dim=4, num_negatives=k).double()
    fs, ft = rand(4, dim_s, seed=1), rand(4, dim_t, seed=2)
    idx = torch.tensor([3, 0, 17, 9])
    with torch.no_grad():
        loss(outs({"s": fs}, index=idx), outs({"t": ft}, index=idx))  # materialise; no state change
    return loss, fs, ft, idx


def test_crd_shape_inference_pass_changes_no_state():
    torch.manual_seed(0)
    fresh = CRD("s", "t", num_data=20, embed_dim=4, num_negatives=7).double()
    loss, *_ = make_crd()
    assert torch.equal(loss.memory_student, fresh.memory_student) and torch.equal(loss.normaliser, fresh.normaliser)
    assert float(loss.normaliser[0]) == -1.0


def test_crd_matches_nce_reference_and_updates_bank():
    loss, fs, ft, idx = make_crd()
    ms0, mt0 = loss.memory_student.clone(), loss.memory_teacher.clone()
    torch.manual_seed(123)
    value = loss(outs({"s": fs}, index=idx), outs({"t": ft}, index=idx))
    torch.manual_seed(123)
    rows = torch.cat([idx[:, None], torch.randint(20, (4, 7))], 1)
    ws, bs = loss.embed_student.weight.detach(), loss.embed_student.bias.detach()
    wt, bt = loss.embed_teacher.weight.detach(), loss.embed_teacher.bias.detach()
    vs = fs @ ws.t() + bs
    vs = vs / vs.norm(dim=1, keepdim=True)
    vt = ft @ wt.t() + bt
    vt = vt / vt.norm(dim=1, keepdim=True)
    T, k, nd = 0.07, 7, 20
    h_s = torch.tensor([[math.exp(float((mt0[r] * vs[i]).sum()) / T) for r in rows[i]] for i in range(4)], dtype=D)
    h_t = torch.tensor([[math.exp(float((ms0[r] * vt[i]).sum()) / T) for r in rows[i]] for i in range(4)], dtype=D)
    ref = 0.0
    for h in (h_s, h_t):
        h = h / (h.mean() * nd)  # Z fixed on the first training batch
        pn = k / nd
        ref += -sum(math.log(h[i, 0] / (h[i, 0] + pn + 1e-7)) + sum(math.log(pn / (h[i, j] + pn + 1e-7))
                                                                  for j in range(1, k + 1)) for i in range(4)) / 4
    assert math.isclose(float(value), ref, rel_tol=1e-9)
    # bank: momentum 0.5 at the batch rows, renormalised; other rows untouched
    for bank, old, v in ((loss.memory_student, ms0, vs), (loss.memory_teacher, mt0, vt)):
        new = 0.5 * old[idx] + 0.5 * v
        assert torch.allclose(bank[idx], new / new.norm(dim=1, keepdim=True), rtol=1e-12)
        rest = torch.ones(20, dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(bank[rest], old[rest])
    assert float(loss.normaliser[0]) > 0 and float(loss.normaliser[1]) > 0
    state = loss.state_dict()
    assert {"memory_student", "memory_teacher", "normaliser"} <= set(state)
    assert {n for n, _ in loss.named_buffers()} == {"memory_student", "memory_teacher", "normaliser"}


def test_crd_state_round_trip_and_index_errors():
    loss, fs, ft, idx = make_crd()
    loss(outs({"s": fs}, index=idx), outs({"t": ft}, index=idx))
    other = CRD("s", "t", num_data=20, embed_dim=4, num_negatives=7).double()
    with torch.no_grad():
        other(outs({"s": fs}, index=idx), outs({"t": ft}, index=idx))
    other.load_state_dict(loss.state_dict())
    torch.manual_seed(5)
    a = loss(outs({"s": fs}, index=idx), outs({"t": ft}, index=idx))
    torch.manual_seed(5)
    b = other(outs({"s": fs}, index=idx), outs({"t": ft}, index=idx))
    assert torch.equal(a, b) and torch.equal(loss.memory_teacher, other.memory_teacher)
    with pytest.raises(ValueError, match="num_data"):
        loss(outs({"s": fs}, index=idx + 100), outs({"t": ft}))
    with pytest.raises(ValueError, match="index"):
        loss(outs({"s": fs}), outs({"t": ft}))
    with pytest.raises(kdcore.ConfigError, match="num_data"):
        kdcore.create("loss", "crd")


# -- reviewkd ----------------------------------------------------------------------------------------
def nearest(x, h, w):
    return x.repeat_interleave(h // x.shape[-2], 2).repeat_interleave(w // x.shape[-1], 3)


def conv3x3(x, w):
    return torch.nn.functional.conv2d(x, w, padding=1)


def hcl_reference(fs, ft):
    h = fs.shape[-1]
    loss, wsum, wt = ((fs - ft) ** 2).mean(), 1.0, 1.0
    for level in (4, 2, 1):
        if level >= h:
            continue
        wt /= 2
        loss = loss + wt * ((block_mean(fs, level, level) - block_mean(ft, level, level)) ** 2).mean()
        wsum += wt
    return loss / wsum


def test_reviewkd_matches_abf_hcl_reference():
    s = [rand(3, 2, 8, 8, seed=1), rand(3, 3, 4, 4, seed=2), rand(3, 4, 2, 2, seed=3), rand(3, 4, 2, 2, seed=3)]
    t = [rand(3, 5, 8, 8, seed=4), rand(3, 6, 4, 4, seed=5), rand(3, 7, 2, 2, seed=6), rand(3, 7, 2, 2, seed=6)]
    loss = ReviewKD(["a", "b", "c", "c"], ["x", "y", "z", "z"])
    value = loss(outs(dict(zip("abc", s))), outs(dict(zip("xyz", t))))
    s[-1], t[-1] = s[-1].mean((2, 3), keepdim=True), t[-1].mean((2, 3), keepdim=True)  # pool_last
    assert loss.abfs[0].conv1[0].out_channels == 4  # mid = min(512, C_last)
    residual, ref = None, 0.0
    for i in reversed(range(4)):
        abf = loss.abfs[i]
        x = bn_train(conv1x1(s[i], abf.conv1[0].weight.detach()), abf.conv1[1])
        if residual is not None:
            y = nearest(residual, *x.shape[-2:])
            wa, ba = abf.att_conv[0].weight.detach(), abf.att_conv[0].bias.detach()
            z = torch.sigmoid(conv1x1(torch.cat([x, y], 1), wa) + ba.view(1, -1, 1, 1))
            x = x * z[:, :1] + y * z[:, 1:2]
        else:
            assert abf.att_conv is None
        residual = x
        out = bn_train(conv3x3(x, abf.conv2[0].weight.detach()), abf.conv2[1])
        ref = ref + hcl_reference(out, t[i])
    assert torch.allclose(value, ref, rtol=1e-9)


# -- uskd --------------------------------------------------------------------------------------------
def uskd_reference(z, mid, y, fc, alpha=0.1, beta=0.1, mu=0.1):
    n, c = z.shape
    w = mid @ fc.weight.detach().t() + fc.bias.detach()
    s = torch.softmax(z, 1)
    s_t2 = [float(s[i, y[i]]) ** 2 for i in range(n)]
    mean_st2 = sum(s_t2) / n
    loss_t = -sum((s_t2[i] + 1 - mean_st2) * math.log(float(s[i, y[i]])) for i in range(n)) / n
    pw = torch.softmax(w, 1)
    loss_weak = 0.0
    loss_non = 0.0
    for i in range(n):
        soft = [0.1 / c + (0.9 if j == y[i] else 0.0) for j in range(c)]
        loss_weak += -mu * sum(soft[j] * math.log(float(pw[i, j])) for j in range(c)) / n
        score = [float(pw[i, j]) / (1 - float(pw[i, y[i]]) + 1e-6) + float(s[i, j]) / (1 - float(s[i, y[i]]) + 1e-6)
                 for j in range(c)]
        order = sorted(range(c), key=lambda j: -score[j])
        rank = {j: r + 1 for r, j in enumerate(order)}
        others = [j for j in range(c) if j != y[i]]
        zipf = {j: 1.0 / rank[j] for j in others}
        tot = sum(zipf.values())
        lse = math.log(sum(math.exp(float(z[i, j])) for j in others))
        loss_non += -sum(zipf[j] / tot * (float(z[i, j]) - lse) for j in others) / n
    return alpha * loss_t + beta * loss_non + loss_weak


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6), st.integers(3, 9))
def test_uskd_matches_reference_without_teacher(seed, n, c):
    z, mid = rand(n, c, seed=seed) * 2, rand(n, 5, 2, 2, seed=seed + 1)
    y = torch.randint(c, (n,), generator=torch.Generator().manual_seed(seed))
    loss = USKD("m")
    assert loss.uses_teacher is False and loss.teacher_taps == []
    value = loss(outs({"m": mid}, logits=z), None, y)
    ref = uskd_reference(z, mid.mean((2, 3)), y.tolist(), loss.fc)
    assert math.isclose(float(value), ref, rel_tol=1e-8, abs_tol=1e-12)


def test_uskd_ignores_minus_100_rows():
    z, mid = rand(5, 4, seed=1), rand(5, 3, seed=2)
    y = torch.tensor([1, -100, 2, 0, -100])
    loss = USKD("m")
    value = loss(outs({"m": mid}, logits=z), None, y)
    keep = y != -100
    assert math.isclose(float(value), uskd_reference(z[keep], mid[keep], y[keep].tolist(), loss.fc), rel_tol=1e-8)


# -- gradients, connectors, flags --------------------------------------------------------------------
SHAPES_S = {"a": (4, 3, 8, 8), "b": (4, 5, 4, 4)}
SHAPES_T = {"x": (4, 6, 8, 8), "y": (4, 7, 4, 4)}


def losses_under_test():
    return {
        "fitnet": (FitNet(["a", "b"], ["x", "y"]), True),
        "at": (AT(["a", "b"], ["x", "y"]), False),
        "sp": (SP(["a", "b"], ["x", "y"]), False),
        "pkt": (PKT("b", "y"), False),
        "relational": (Relational("b", "y"), False),
        "vid": (VID(["a", "b"], ["x", "y"]), True),
        "crd": (CRD("b", "y", num_data=10, num_negatives=6), True),  # not cast: connectors follow the features
        "reviewkd": (ReviewKD(["a", "b"], ["x", "y"]), True),
        "uskd": (USKD("b"), True),
    }


@pytest.mark.parametrize("name", list(losses_under_test()))
def test_gradients_reach_student_features_and_connectors_only(name):
    loss, has_connectors = losses_under_test()[name]
    fs = {k: rand(*v, seed=i).requires_grad_() for i, (k, v) in enumerate(SHAPES_S.items())}
    ft = {k: rand(*v, seed=9 + i).requires_grad_() for i, (k, v) in enumerate(SHAPES_T.items())}
    idx = torch.arange(4)
    logits = rand(4, 3, seed=5).requires_grad_()
    s = outs(fs, logits=logits, index=idx)
    t = outs(ft, index=idx)
    with torch.no_grad():  # the engine's shape-inference pass
        loss(s, t if loss.uses_teacher else None, torch.tensor([0, 1, 2, 1]))
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in loss.parameters())
    value = loss(s, t if loss.uses_teacher else None, torch.tensor([0, 1, 2, 1]))
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    used = [fs[k] for k in loss.student_taps]
    assert all(f.grad is not None and float(f.grad.abs().sum()) > 0 for f in used)
    assert all(f.grad is None for f in ft.values())
    params = [p for p in loss.parameters() if p.requires_grad]
    assert bool(params) == has_connectors
    assert all(p.grad is not None for p in params)
    if name == "uskd":
        assert logits.grad is not None


def test_connector_parameter_counts():
    fit = FitNet("a", "x")
    fit(outs({"a": rand(2, 3, 8, 8)}), outs({"x": rand(2, 6, 8, 8)}))
    assert sum(p.numel() for p in fit.parameters()) == 3 * 6 + 6 + 2 * 6  # 1x1 conv + bias, BN
    vid = VID("a", "x")
    vid(outs({"a": rand(2, 3, 8, 8)}), outs({"x": rand(2, 6, 8, 8)}))
    assert sum(p.numel() for p in vid.parameters()) == 3 * 6 + 6 * 6 + 6 * 6 + 6
    crd = CRD("a", "x", num_data=5, num_negatives=3, embed_dim=4)
    crd(outs({"a": rand(2, 3)}, index=torch.tensor([0, 1])), outs({"x": rand(2, 6)}))
    assert sum(p.numel() for p in crd.parameters()) == (3 * 4 + 4) + (6 * 4 + 4)
    assert sum(p.numel() for p in AT("a", "x").parameters()) == 0
    rv = ReviewKD(["a", "b"], ["x", "y"])
    rv(outs({"a": rand(2, 3, 8, 8), "b": rand(2, 5, 4, 4)}), outs({"x": rand(2, 6, 8, 8), "y": rand(2, 7, 4, 4)}))
    mid = 5
    abf0 = 3 * mid + 2 * mid + mid * 6 * 9 + 2 * 6 + (2 * mid * 2 + 2)  # fused level
    abf1 = 5 * mid + 2 * mid + mid * 7 * 9 + 2 * 7
    assert sum(p.numel() for p in rv.parameters()) == abf0 + abf1


def test_connectors_save_and_restore():
    fs, ft = rand(3, 3, 8, 8), rand(3, 6, 4, 4, seed=1)
    a = FitNet("a", "x")
    a(outs({"a": fs}), outs({"x": ft}))
    b = FitNet("a", "x")
    with torch.no_grad():
        b(outs({"a": fs}), outs({"x": ft}))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(outs({"a": fs}), outs({"x": ft})), b(outs({"a": fs}), outs({"x": ft})))


def test_batch_level_flags_and_declared_attributes():
    flags = {name: bool(getattr(loss, "batch_level", False)) for name, (loss, _) in losses_under_test().items()}
    assert flags == {"fitnet": False, "at": False, "sp": True, "pkt": True, "relational": True, "vid": False,
                     "crd": True, "reviewkd": False, "uskd": True}
    for name in flags:
        cls = type(losses_under_test()[name][0])
        assert cls.uses_outputs is True and isinstance(kdcore.create("loss", name, **(
            {"num_data": 4} if name == "crd" else {})), cls)


def test_tap_pairs_must_agree_and_bad_paths_are_config_errors():
    with pytest.raises(kdcore.ConfigError, match=r"at: .*same length"):
        AT(["a", "b"], ["x"])
    with pytest.raises(kdcore.ConfigError, match="student_layers"):
        kdcore.create("loss", "at", student_layers=[])
    with pytest.raises(ValueError, match=r"sp: student feature 'q'"):
        SP("q", "x")(outs({"a": rand(2, 3)}), outs({"x": rand(2, 3)}))


@pytest.mark.parametrize("negatives", [7, 11])  # 40 bank rows: gathered rows for 8 per sample, bank @ v^T for 12
def test_crd_scores_both_ways_match_the_definition(negatives):
    loss = kdcore.create("loss", "crd", student_layers="s", teacher_layers="t", num_data=40,
                         num_negatives=negatives)
    g = torch.Generator().manual_seed(5)
    bank = torch.randn(40, 5, generator=g, dtype=torch.float64)
    v = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.randint(40, (4, negatives + 1), generator=g)
    rows[0, :3] = 2  # repeated rows
    weights = torch.randn(4, negatives + 1, generator=g, dtype=torch.float64)
    got = loss._scores(bank, v, rows)
    (grad,) = torch.autograd.grad((got * weights).sum(), v)
    ref = (bank[rows] * v.detach()[:, None, :]).sum(-1)  # bank[rows[i, j]] . v[i]
    ref_grad = (weights[:, :, None] * bank[rows]).sum(1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
