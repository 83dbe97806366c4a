"""tand against an independent float64 reference (TAND paper eq. 7-9 with the
T^2 convention of methods.md), its composition from nkd and dkd, the
divergence options, and (kdcore.testing)
the call conventions: token level, ignored positions, chunking, bf16 inputs."""

import pytest
import torch

import kdcore
from kdcore.testing import check_logit_loss, random_logits, random_targets, value_and_grad

IGNORE = -100
F64 = torch.float64


# ---------------------------------------------------------------- reference
def softmax_row(z, T):
    """Plain float64 softmax of one row, written out (``-inf`` gives 0)."""
    m = max(float(v.detach()) for v in z if torch.isfinite(v))
    e = [torch.exp((v - m) / T) if torch.isfinite(v) else torch.zeros((), dtype=F64) for v in z]
    total = sum(e)
    return [x / total for x in e]


def parts_row(z, t, T):
    """(b, rho) of one row: b = [p_t, 1 - p_t], rho over classes != t."""
    p = softmax_row(z, T)
    others = [k for k in range(len(p)) if k != t]
    rest = sum(p[k] for k in others)
    return [p[t], rest], [p[k] / rest for k in others]


def ce_terms(p, q):
    return -sum((pk * torch.log(qk) for pk, qk in zip(p, q) if pk > 0), torch.zeros((), dtype=F64))


def kl_terms(p, q):
    return sum((pk * torch.log(pk / qk) for pk, qk in zip(p, q) if pk > 0), torch.zeros((), dtype=F64))


def rkl_terms(p, q):
    return kl_terms(q, p)


def reference_tand(zs, zt, y, T, alpha, beta, gamma, tckd=kl_terms, nckd=kl_terms, nkd=ce_terms):
    """Mean over kept rows of
    -p_t log q_t (T=1) + gamma T^2 nkd(rho^t, rho^s) + T^2 (alpha tckd(b) + beta nckd(rho))."""
    c = zs.shape[-1]
    zs, zt, y = zs.reshape(-1, c), zt.reshape(-1, c), y.reshape(-1)
    total, count = torch.zeros((), dtype=F64), 0
    for i in range(zs.shape[0]):
        t = int(y[i])
        if t == IGNORE:
            continue
        s_row, t_row = list(zs[i]), list(zt[i])
        p_t, q_t = softmax_row(t_row, 1.0)[t], softmax_row(s_row, 1.0)[t]
        target = -p_t * torch.log(q_t) if p_t > 0 else torch.zeros((), dtype=F64)
        (b_t, rho_t), (b_s, rho_s) = parts_row(t_row, t, T), parts_row(s_row, t, T)
        row = target + T * T * (gamma * nkd(rho_t, rho_s) + alpha * tckd(b_t, b_s) + beta * nckd(rho_t, rho_s))
        total = total + row
        count += 1
    return total / max(count, 1)


def with_reference_grad(zs, zt, y, **kw):
    return value_and_grad(reference_tand, zs.double(), zt.detach().double(), y, **kw)


def assert_close(a, b, rtol=2e-5, atol=2e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


SETTINGS = [  # (alpha, beta, gamma, T)
    (1.0, 2.0, 1.5, 1.0),   # defaults (DS-NER)
    (2.0, 0.5, 0.5, 1.0),   # vision / noisy labels
    (1.0, 2.0, 1.5, 2.0),
    (0.5, 1.0, 0.0, 4.0),
    (0.0, 0.0, 1.0, 0.5),
]


# ---------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("alpha,beta,gamma,T", SETTINGS)
def test_matches_reference_flat(alpha, beta, gamma, T):
    zs, zt, y = random_logits(9, 7, seed=1), random_logits(9, 7, seed=2), random_targets(9, classes=7)
    loss = kdcore.create("loss", "tand", alpha=alpha, beta=beta, gamma=gamma, temperature=T)
    value, grad = value_and_grad(loss, zs, zt, y)
    ref_value, ref_grad = with_reference_grad(zs, zt, y, T=T, alpha=alpha, beta=beta, gamma=gamma)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)


def test_defaults():
    loss = kdcore.create("loss", "tand")
    assert (loss.alpha, loss.beta, loss.gamma, loss.temperature) == (1.0, 2.0, 1.5, 1.0)
    zs, zt, y = random_logits(5, 6, seed=3), random_logits(5, 6, seed=4), random_targets(5, classes=6)
    assert_close(loss(zs, zt, y), reference_tand(zs.double(), zt.double(), y, T=1.0, alpha=1.0, beta=2.0,
                                                 gamma=1.5))


def test_matches_reference_tokens_with_ignored_positions():
    zs, zt = random_logits(3, 5, 11, seed=5), random_logits(3, 5, 11, seed=6)
    y = random_targets(3, 5, classes=11, ignore_frac=0.3)
    y[2, 4] = IGNORE
    loss = kdcore.create("loss", "tand", temperature=2.0)
    value, grad = value_and_grad(loss, zs, zt, y)
    ref_value, ref_grad = with_reference_grad(zs, zt, y, T=2.0, alpha=1.0, beta=2.0, gamma=1.5)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)
    assert torch.all(grad[y == IGNORE] == 0)


@pytest.mark.parametrize("alpha,beta,gamma,T", SETTINGS[:4])
def test_is_nkd_plus_dkd(alpha, beta, gamma, T):
    """eq. 9: L_TAND = L_NKD + L_TAD, TAD being DKD's form."""
    zs, zt = random_logits(2, 4, 9, seed=7), random_logits(2, 4, 9, seed=8)
    y = random_targets(2, 4, classes=9, ignore_frac=0.2)
    tand = kdcore.create("loss", "tand", alpha=alpha, beta=beta, gamma=gamma, temperature=T)
    nkd = kdcore.create("loss", "nkd", gamma=gamma, temperature=T)
    dkd = kdcore.create("loss", "dkd", alpha=alpha, beta=beta, temperature=T)
    assert_close(tand(zs, zt, y), nkd(zs, zt, y) + dkd(zs, zt, y), rtol=1e-6, atol=1e-6)


def test_gamma_and_beta_act_on_the_same_nontarget_shape():
    """With KL, NKD's non-target CE is NCKD plus the teacher-only H(rho^t): the
    student gradients depend on beta + gamma only."""
    zs, zt, y = random_logits(8, 6, seed=9), random_logits(8, 6, seed=10), random_targets(8, classes=6)
    _, g1 = value_and_grad(kdcore.create("loss", "tand", beta=2.0, gamma=1.5, temperature=2.0), zs, zt, y)
    _, g2 = value_and_grad(kdcore.create("loss", "tand", beta=3.5, gamma=0.0, temperature=2.0), zs, zt, y)
    assert_close(g1, g2)


# ---------------------------------------------------------------- divergences
class Jeffreys:
    """A custom divergence object: KL(p || q) + KL(q || p) = sum_k (p_k - q_k)(log p_k - log q_k)."""

    def __call__(self, teacher_logp, student_logp):
        diff = (teacher_logp - student_logp).nan_to_num(0.0, 0.0, 0.0)
        return ((teacher_logp.exp() - student_logp.exp()) * diff).sum(-1)


def jeffreys_terms(p, q):
    return kl_terms(p, q) + kl_terms(q, p)


RKL3 = {"tckd": rkl_terms, "nckd": rkl_terms, "nkd": rkl_terms}


@pytest.mark.parametrize("params,terms", [
    ({"divergence": "rkl"}, RKL3),
    ({"divergence": {"name": "rkl"}}, RKL3),
    ({"divergence": "kl"}, {"nkd": kl_terms}),
    ({"divergence": Jeffreys()}, {"tckd": jeffreys_terms, "nckd": jeffreys_terms, "nkd": jeffreys_terms}),
    ({"tckd_divergence": "rkl"}, {"tckd": rkl_terms}),
    ({"nckd_divergence": "rkl"}, {"nckd": rkl_terms}),
    ({"nkd_divergence": "rkl"}, {"nkd": rkl_terms}),
    ({"divergence": "rkl", "nkd_divergence": Jeffreys(), "tckd_divergence": "kl"},
     {"nckd": rkl_terms, "nkd": jeffreys_terms}),
])
def test_divergence_parameters(params, terms):
    zs, zt, y = random_logits(6, 8, seed=11), random_logits(6, 8, seed=12), random_targets(6, classes=8)
    loss = kdcore.create("loss", "tand", temperature=2.0, **params)
    value, grad = value_and_grad(loss, zs, zt, y)
    ref_value, ref_grad = with_reference_grad(zs, zt, y, T=2.0, alpha=1.0, beta=2.0, gamma=1.5, **terms)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)


requires_ab = pytest.mark.skipif("ab" not in kdcore.available("divergence"),
                                 reason="divergence 'ab' (kdcore-abkd) is not installed")


@requires_ab
@pytest.mark.parametrize("ab,same_as", [((1.0, 0.0), "kl"), ((0.0, 1.0), "rkl")])
def test_ab_divergence_limits(ab, same_as):
    """AB(1, 0) = KL and AB(0, 1) = reverse KL (ABKD paper), in all three parts."""
    zs, zt, y = random_logits(6, 8, seed=13), random_logits(6, 8, seed=14), random_targets(6, classes=8)
    spec = {"name": "ab", "alpha": ab[0], "beta": ab[1]}
    v_ab, g_ab = value_and_grad(kdcore.create("loss", "tand", temperature=2.0, divergence=spec), zs, zt, y)
    v, g = value_and_grad(kdcore.create("loss", "tand", temperature=2.0, divergence=same_as), zs, zt, y)
    assert_close(v_ab, v, rtol=1e-4, atol=1e-5)
    assert_close(g_ab, g, rtol=1e-4, atol=1e-5)


@requires_ab
def test_ab_divergence_finite_on_extremes():
    zs, zt, y = random_logits(4, 9, seed=15, scale=1e4), random_logits(4, 9, seed=16), random_targets(4, classes=7)
    zs[:, 7:] = zt[:, 7:] = float("-inf")
    x = zs.clone().requires_grad_()
    value = kdcore.create("loss", "tand", divergence={"name": "ab", "alpha": 0.8, "beta": 0.3})(x, zt, y)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- extremes, padded columns, transforms
def test_confident_teacher_is_exact():
    zs, zt, y = random_logits(6, 7, seed=17), random_logits(6, 7, seed=18), random_targets(6, classes=7)
    zt[torch.arange(6), y] = 200.0
    value, grad = value_and_grad(kdcore.create("loss", "tand"), zs, zt, y)
    ref_value, ref_grad = with_reference_grad(zs, zt, y, T=1.0, alpha=1.0, beta=2.0, gamma=1.5)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)


def test_padded_columns_match_reference():
    zs, zt, y = random_logits(6, 9, seed=19), random_logits(6, 9, seed=20), random_targets(6, classes=6)
    zs[:, 6:] = zt[:, 6:] = float("-inf")
    value, grad = value_and_grad(kdcore.create("loss", "tand", temperature=2.0), zs, zt, y)
    ref_value, _ = with_reference_grad(zs[:, :6], zt[:, :6], y, T=2.0, alpha=1.0, beta=2.0, gamma=1.5)
    assert_close(value, ref_value)
    assert torch.isfinite(grad).all() and torch.all(grad[:, 6:] == 0)


def test_teacher_transform():
    zs, zt, y = random_logits(5, 6, seed=25), random_logits(5, 6, seed=26), random_targets(5, classes=6)
    loss = kdcore.create("loss", "tand", temperature=3.0,
                         transforms=[{"name": "temperature", "temperature": 2.0}])
    assert_close(loss(zs, zt, y), reference_tand(zs.double(), zt.double() / 2, y, T=3.0, alpha=1.0,
                                                 beta=2.0, gamma=1.5))


# ---------------------------------------------------------------- call conventions
@pytest.mark.parametrize("params", [{}, {"temperature": 2.0, "alpha": 2.0, "beta": 0.5, "gamma": 0.5},
                                    {"temperature": 4.0, "divergence": "rkl", "nkd_divergence": Jeffreys()}])
def test_follows_the_logit_loss_conventions(params):
    """kdcore.testing: token level == flat, -100 positions, bf16 inputs, chunking."""
    check_logit_loss(kdcore.create("loss", "tand", **params))
