"""The gradient-aware schedulers through kdcore.losses.weighting: a minimal fake context on a
tiny model, checked against gradients taken here with plain autograd."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import kdcore
from kdcore.losses.schedule import Progress
from kdcore.losses.weighting import GradientContext, GradientWeighting, Update, unflatten_into
from kdcore_schedulers.multitask import pcgrad_orders


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def setup(seed=0, n=16):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    teacher = nn.Sequential(nn.Linear(6, 3)).double()
    data = [(torch.randn(n, 6, dtype=torch.float64), torch.randint(0, 3, (n,))) for _ in range(2)]
    terms = {"ce": (kdcore.create("loss", "ce"), 1.0), "kd": (kdcore.create("loss", "kd", temperature=2.0), 0.7)}
    return model, teacher, data, terms


def term_losses(model, teacher, terms, x, y, skip=()):
    s, t = model(x), teacher(x).detach()
    return {k: w * loss(s, t, y) for k, (loss, w) in terms.items() if k not in skip}


def context(model, teacher, terms, data, step=0, skip=()):
    (x, y), (xa, ya) = data
    roles = {"ce": "ce", "kd": "kd", "rkd": "kd", "reg": "kd"}
    losses = term_losses(model, teacher, terms, x, y, skip)
    return GradientContext(losses, {k: roles[k] for k in losses}, list(model.parameters()),
                           Progress(1, step, 4, 10), lambda names=None: term_losses(model, teacher, terms, xa, ya, skip))


def flat_grad(model, loss):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)]).numpy()


def reference_grads(model, teacher, terms, data):
    (x, y), (xa, ya) = data
    out = {k: flat_grad(model, v) for k, v in term_losses(model, teacher, terms, x, y).items()}
    out["ref"] = flat_grad(model, term_losses(model, teacher, terms, xa, ya)["ce"])
    return out


def test_registered_as_gradient_weighting():
    for name in ["crossbatch", "mgda", "pcgrad"]:
        assert isinstance(kdcore.create("scheduler", name), GradientWeighting)
    assert kdcore.create("scheduler", "crossbatch").needs_aux_batch
    assert not kdcore.create("scheduler", "mgda").needs_aux_batch


@pytest.mark.parametrize("c", [0.5, 1.5])
def test_crossbatch_paper_update_matches_reference(c):
    model, teacher, data, terms = setup()
    ref = reference_grads(model, teacher, terms, data)
    sched = kdcore.create("scheduler", "crossbatch", c=c)
    update = sched.combine(context(model, teacher, terms, data))
    g_ce, g_kd = ref["ce"], ref["kd"]
    w_kd = np.linalg.norm(g_ce) / np.linalg.norm(g_kd)             # eqs. 8-9 (the finding)
    g0, g_w = 0.5 * (g_ce + g_kd), g_ce + w_kd * g_kd
    lam = c * np.linalg.norm(g0) / np.linalg.norm(g_w)              # eq. 10
    np.testing.assert_allclose(update.grad.numpy(), g0 + lam * g_w, rtol=1e-10)  # eq. 11
    info = update.info
    assert info["w_kd"] == pytest.approx(w_kd) and info["lam"] == pytest.approx(lam)
    g_ref = ref["ref"]
    assert info["cos_ce_ref"] == pytest.approx(g_ce @ g_ref / np.linalg.norm(g_ce) / np.linalg.norm(g_ref))
    assert info["cos_kd_ref"] == pytest.approx(g_kd @ g_ref / np.linalg.norm(g_kd) / np.linalg.norm(g_ref))
    assert info["norm_ce"] == pytest.approx(np.linalg.norm(g_ce))
    assert all(isinstance(v, float) and math.isfinite(v) for v in info.values())


def test_crossbatch_every_k_coefficients_reproduce_the_update():
    model, teacher, data, terms = setup(1)
    sched = kdcore.create("scheduler", "crossbatch", every=3, mode="align")
    assert sched.wants_gradients(Progress(1, 5, 4, 10))  # nothing cached yet
    update = sched.combine(context(model, teacher, terms, data))
    assert [sched.wants_gradients(Progress(1, s, 4, 10)) for s in range(7)] == [True, False, False] * 2 + [True]
    coef = sched.coefficients()
    assert coef == {"ce": pytest.approx(update.info["coef_ce"]), "kd": pytest.approx(update.info["coef_kd"])}
    x, y = data[0]
    losses = term_losses(model, teacher, terms, x, y)
    combined = flat_grad(model, sum(coef[k] * v for k, v in losses.items()))
    # equal up to the float32 rounding inside the losses (LogitLoss evaluates rows in float32)
    np.testing.assert_allclose(combined, update.grad.numpy(), rtol=1e-5, atol=1e-9)

    restored = kdcore.create("scheduler", "crossbatch", every=3)
    restored.load_state_dict(sched.state_dict())
    assert restored.coefficients() == coef and not restored.wants_gradients(Progress(1, 4, 4, 10))


def test_crossbatch_explicit_groups_other_terms_and_missing_terms():
    model, teacher, data, terms = setup(2)
    terms["reg"] = (kdcore.create("loss", "rkd", temperature=1.0), 0.3)
    ref = reference_grads(model, teacher, terms, data)
    sched = kdcore.create("scheduler", "crossbatch", ce_terms=["ce"], kd_terms=["kd"])
    update = sched.combine(context(model, teacher, terms, data))
    i = update.info
    want = i["coef_ce"] * ref["ce"] + i["coef_kd"] * ref["kd"] + ref["reg"]  # "reg" in no group: weight 1
    np.testing.assert_allclose(update.grad.numpy(), want, rtol=1e-10)
    assert set(sched.coefficients()) == {"ce", "kd"}
    assert (i["coef/ce"], i["coef/kd"], i["coef/reg"]) == (i["coef_ce"], i["coef_kd"], 1.0)
    # the KD term absent (time weight 0 on this step): a zero gradient, no error, no NaN
    update = sched.combine(context(model, teacher, terms, data, skip=("kd",)))
    assert update.info["w_kd"] == 0.0 and torch.isfinite(update.grad).all()
    np.testing.assert_allclose(update.grad.numpy(), (0.5 + update.info["lam"]) * ref["ce"] + ref["reg"],
                               rtol=1e-10)


def test_crossbatch_needs_the_auxiliary_batch():
    model, teacher, data, terms = setup()
    ctx = context(model, teacher, terms, data)
    ctx.aux_losses = None
    with pytest.raises(RuntimeError, match="auxiliary"):
        kdcore.create("scheduler", "crossbatch").combine(ctx)


def test_mgda_through_the_context():
    model, teacher, data, terms = setup(3)
    ref = reference_grads(model, teacher, terms, data)
    update = kdcore.create("scheduler", "mgda").combine(context(model, teacher, terms, data))
    g1, g2 = ref["ce"], ref["kd"]
    gamma = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0, 1)
    np.testing.assert_allclose(update.grad.numpy(), gamma * g1 + (1 - gamma) * g2, rtol=1e-10)
    assert update.info["w_ce"] == pytest.approx(gamma) and update.info["w_kd"] == pytest.approx(1 - gamma)
    assert update.info["coef/ce"] == update.info["w_ce"] and update.info["coef/kd"] == update.info["w_kd"]


@pytest.mark.parametrize("seed", [None, 0])
def test_pcgrad_through_the_context(seed):
    model, teacher, data, terms = setup(4)
    terms["rkd"] = (kdcore.create("loss", "rkd", temperature=1.0), 2.0)
    ref = reference_grads(model, teacher, terms, data)
    sched = kdcore.create("scheduler", "pcgrad", seed=seed)
    update = sched.combine(context(model, teacher, terms, data, step=3))
    names = ["ce", "kd", "rkd"]
    grads = [ref[n] for n in names]
    out = np.zeros_like(grads[0])
    for i, order in enumerate(pcgrad_orders(3, seed, 3)):
        gp = grads[i].copy()
        for j in order:
            if gp @ grads[j] < 0:
                gp -= gp @ grads[j] / (grads[j] @ grads[j]) * grads[j]
        out += gp
    np.testing.assert_allclose(update.grad.numpy(), out, rtol=1e-9)
    assert {f"coef/{n}" for n in names} <= set(update.info)


@pytest.mark.parametrize("name, kw", [("crossbatch", {}), ("crossbatch", {"mode": "align", "every": 2}),
                                      ("mgda", {}), ("pcgrad", {"seed": 1})])
def test_engine_like_loop_trains(name, kw):
    """The engine's use of the seam (combine on gradient steps, coefficients otherwise)."""
    model, teacher, data, terms = setup(5, n=64)
    model.float(), teacher.float()
    data = [(x.float(), y) for x, y in data]
    sched = kdcore.create("scheduler", name, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(model.parameters())
    first = None
    for step in range(40):
        progress = Progress(step // 10 + 1, step, 4, 10)
        if sched.wants_gradients(progress):
            ctx = context(model, teacher, terms, data, step=step)
            update = sched.combine(ctx)
            assert isinstance(update, Update) and update.grad.dtype == torch.float32
            opt.zero_grad()
            unflatten_into(update.grad, params)
        else:
            c = sched.coefficients()
            losses = term_losses(model, teacher, terms, *data[0])
            opt.zero_grad()
            sum(c.get(k, 1.0) * v for k, v in losses.items()).backward()
        opt.step()
        with torch.no_grad():
            total = float(sum(term_losses(model, teacher, terms, *data[0]).values()))
        first = total if first is None else first
    assert math.isfinite(total) and total < first


@pytest.mark.parametrize("name, kw, key", [
    ("crossbatch", {"mode": "cagrad"}, "mode"), ("crossbatch", {"every": 0}, "every"),
    ("crossbatch", {"c": -0.1}, "c"), ("crossbatch", {"ce_terms": ["a"], "kd_terms": ["a"]}, "kd_terms"),
    ("crossbatch", {"ce_terms": "ce"}, "ce_terms"), ("mgda", {"kd_terms": [1]}, "kd_terms"),
    ("pcgrad", {"seed": 1.5}, "seed"), ("pcgrad", {"terms": ["a", "a"]}, "terms"), ("pcgrad", {"terms": ["a"]}, "terms"),
    ("crossbatch", {"alpha": 0.5}, "alpha"),
])
def test_parameter_errors(name, kw, key):
    with pytest.raises(kdcore.ConfigError, match=key):
        kdcore.create("scheduler", name, **kw)
