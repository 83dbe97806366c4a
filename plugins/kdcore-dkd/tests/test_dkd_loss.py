"""dkd against an independent float64 reference (TAND paper eq. 3-5), the KL
decomposition of thm 2.1, divergence plumbing, and (kdcore.testing)
the call conventions: token level, ignored positions, chunking, bf16 inputs."""

import math

import pytest
import torch

import kdcore
from kdcore.testing import check_logit_loss, random_logits, random_targets, value_and_grad

IGNORE = -100


# ---------------------------------------------------------------- reference
def softmax_row(z, T):
    """Plain float64 softmax of one row, written out (``-inf`` gives 0)."""
    m = max(float(v.detach()) for v in z if torch.isfinite(v))
    e = [torch.exp((v - m) / T) if torch.isfinite(v) else torch.zeros((), dtype=torch.float64) for v in z]
    total = sum(e)
    return [x / total for x in e]


def kl_terms(p, q):
    """sum_k p_k log(p_k / q_k) over a list of probabilities, 0 where p_k = 0."""
    return sum((pk * torch.log(pk / qk) for pk, qk in zip(p, q) if pk > 0),
               torch.zeros((), dtype=torch.float64))


def rkl_terms(p, q):
    return kl_terms(q, p)


def reference_parts(zs_row, zt_row, t, T):
    """(b^t, b^s, rho^t, rho^s) of one row in float64, rho over classes != t."""
    p, q = softmax_row(zt_row, T), softmax_row(zs_row, T)
    others = [k for k in range(len(p)) if k != t]
    rest_p = sum(p[k] for k in others)   # 1 - p_t, exact even when tiny
    rest_q = sum(q[k] for k in others)
    b_t, b_s = [p[t], rest_p], [q[t], rest_q]
    rho_t = [p[k] / rest_p for k in others]
    rho_s = [q[k] / rest_q for k in others]
    return b_t, b_s, rho_t, rho_s


def reference_dkd(zs, zt, y, T, alpha, beta, tckd=kl_terms, nckd=kl_terms):
    """Mean over kept rows of T^2 (alpha TCKD + beta NCKD), row by row."""
    c = zs.shape[-1]
    zs, zt, y = zs.reshape(-1, c), zt.reshape(-1, c), y.reshape(-1)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(zs.shape[0]):
        t = int(y[i])
        if t == IGNORE:
            continue
        b_t, b_s, rho_t, rho_s = reference_parts(list(zs[i]), list(zt[i]), t, T)
        total = total + T * T * (alpha * tckd(b_t, b_s) + beta * nckd(rho_t, rho_s))
        count += 1
    return total / max(count, 1)


def with_reference_grad(zs, zt, y, **kw):
    return value_and_grad(reference_dkd, zs.double(), zt.detach().double(), y, **kw)


def assert_close(a, b, rtol=2e-5, atol=2e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("T,alpha,beta", [(4.0, 1.0, 8.0), (1.0, 1.0, 1.0), (2.0, 0.5, 3.0), (0.5, 2.0, 0.0)])
def test_matches_reference_flat(T, alpha, beta):
    zs, zt = random_logits(9, 7, seed=1), random_logits(9, 7, seed=2)
    y = random_targets(9, classes=7)
    loss = kdcore.create("loss", "dkd", alpha=alpha, beta=beta, temperature=T)
    value, grad = value_and_grad(loss, zs, zt, y)
    ref_value, ref_grad = with_reference_grad(zs, zt, y, T=T, alpha=alpha, beta=beta)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)


def test_defaults_are_the_papers():
    loss = kdcore.create("loss", "dkd")
    assert (loss.alpha, loss.beta, loss.temperature) == (1.0, 8.0, 4.0)
    zs, zt, y = random_logits(5, 6, seed=3), random_logits(5, 6, seed=4), random_targets(5, classes=6)
    assert_close(loss(zs, zt, y), reference_dkd(zs.double(), zt.double(), y, T=4.0, alpha=1.0, beta=8.0))


def test_matches_reference_tokens_with_ignored_positions():
    zs, zt = random_logits(3, 5, 11, seed=5), random_logits(3, 5, 11, seed=6)
    y = random_targets(3, 5, classes=11, ignore_frac=0.3)
    y[0, 0] = IGNORE
    loss = kdcore.create("loss", "dkd", alpha=1.5, beta=4.0, temperature=2.0)
    value, grad = value_and_grad(loss, zs, zt, y)
    ref_value, ref_grad = with_reference_grad(zs, zt, y, T=2.0, alpha=1.5, beta=4.0)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)
    assert torch.all(grad[y == IGNORE] == 0)


# ---------------------------------------------------------------- divergences
class SquaredEuclidean:
    """A custom divergence object: 0.5 * sum_k (p_k - q_k)^2."""

    def __call__(self, teacher_logp, student_logp):
        return 0.5 * (teacher_logp.exp() - student_logp.exp()).pow(2).sum(-1)


def sq_terms(p, q):
    return 0.5 * sum((pk - qk) ** 2 for pk, qk in zip(p, q))


@pytest.mark.parametrize("params,tckd,nckd", [
    ({"divergence": "rkl"}, rkl_terms, rkl_terms),
    ({"divergence": {"name": "rkl"}}, rkl_terms, rkl_terms),
    ({"tckd_divergence": "rkl"}, rkl_terms, kl_terms),
    ({"nckd_divergence": "rkl"}, kl_terms, rkl_terms),
    ({"divergence": "rkl", "nckd_divergence": "kl"}, rkl_terms, kl_terms),
    ({"divergence": SquaredEuclidean()}, sq_terms, sq_terms),
    ({"nckd_divergence": SquaredEuclidean(), "tckd_divergence": "rkl"}, rkl_terms, sq_terms),
])
def test_divergence_parameters(params, tckd, nckd):
    zs, zt, y = random_logits(6, 8, seed=9), random_logits(6, 8, seed=10), random_targets(6, classes=8)
    loss = kdcore.create("loss", "dkd", alpha=1.0, beta=2.0, temperature=2.0, **params)
    value, grad = value_and_grad(loss, zs, zt, y)
    ref_value, ref_grad = with_reference_grad(zs, zt, y, T=2.0, alpha=1.0, beta=2.0, tckd=tckd, nckd=nckd)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)


# ---------------------------------------------------------------- thm 2.1
def p_target(zt, y, T):
    return torch.tensor([float(softmax_row(list(zt[i].double()), T)[int(y[i])]) for i in range(len(y))],
                        dtype=torch.float64)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kl_decomposition_identity(T):
    """KL(p || q) = TCKD + (1 - p_t) NCKD, row by row (TAND paper thm 2.1)."""
    zs, zt, y = random_logits(10, 9, seed=11), random_logits(10, 9, seed=12), random_targets(10, classes=9)
    tckd = kdcore.create("loss", "dkd", alpha=1.0, beta=0.0, temperature=T).rows(zs, zt, y).double()
    nckd = kdcore.create("loss", "dkd", alpha=0.0, beta=1.0, temperature=T).rows(zs, zt, y).double()
    kl = kdcore.create("loss", "kd", temperature=T).rows(zs, zt, None).double()
    assert_close(kl, tckd + (1 - p_target(zt, y, T)) * nckd, rtol=1e-5, atol=1e-5)


def test_confident_teacher_nckd_is_exact():
    """1 - p_t underflows to 0 in float32 (and float64) yet rho^t is exact: NCKD
    matches the reference and the identity still holds."""
    zs, zt, y = random_logits(6, 7, seed=13), random_logits(6, 7, seed=14), random_targets(6, classes=7)
    zt = zt.clone()
    zt[torch.arange(6), y] = 200.0
    loss = kdcore.create("loss", "dkd", alpha=0.0, beta=1.0, temperature=1.0)
    assert torch.all(torch.softmax(zt, -1)[torch.arange(6), y] == 1.0)
    value, grad = value_and_grad(loss, zs, zt, y)
    ref_value, ref_grad = with_reference_grad(zs, zt, y, T=1.0, alpha=0.0, beta=1.0)
    assert ref_value > 0.1
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)


# ---------------------------------------------------------------- transforms, padded columns
def test_teacher_transform_is_applied_before_the_temperature():
    """A teacher-only temperature transform of 2 equals teacher logits / 2."""
    zs, zt, y = random_logits(5, 6, seed=19), random_logits(5, 6, seed=20), random_targets(5, classes=6)
    loss = kdcore.create("loss", "dkd", temperature=2.0,
                         transforms=[{"name": "temperature", "temperature": 2.0}])
    assert_close(loss(zs, zt, y), reference_dkd(zs.double(), zt.double() / 2, y, T=2.0, alpha=1.0, beta=8.0))


def test_padded_columns_match_reference():
    """-inf columns in both models (padded vocabulary) contribute nothing."""
    zs, zt, y = random_logits(6, 9, seed=21), random_logits(6, 9, seed=22), random_targets(6, classes=6)
    zs[:, 6:] = float("-inf")
    zt[:, 6:] = float("-inf")
    value, grad = value_and_grad(kdcore.create("loss", "dkd", temperature=2.0), zs, zt, y)
    ref_value, _ = with_reference_grad(zs[:, :6], zt[:, :6], y, T=2.0, alpha=1.0, beta=8.0)
    assert_close(value, ref_value)
    assert torch.isfinite(grad).all() and torch.all(grad[:, 6:] == 0)


def test_reference_softmax_is_sane():
    p = softmax_row(list(torch.tensor([0.0, math.log(3.0)], dtype=torch.float64)), 1.0)
    assert abs(float(p[0]) - 0.25) < 1e-12


# ---------------------------------------------------------------- call conventions
@pytest.mark.parametrize("params", [{}, {"temperature": 2.0, "alpha": 0.5, "beta": 3.0, "divergence": "rkl"},
                                    {"temperature": 1.0, "nckd_divergence": SquaredEuclidean()}])
def test_follows_the_logit_loss_conventions(params):
    """kdcore.testing: token level == flat, -100 positions, bf16 inputs, chunking."""
    check_logit_loss(kdcore.create("loss", "dkd", **params))
