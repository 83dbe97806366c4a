"""nkd against an independent float64 reference (TAND paper eq. 7 with the T^2
convention of methods.md), its divergence option, and (kdcore.testing)
the call conventions: token level, ignored positions, chunking, bf16 inputs."""

import pytest
import torch

import kdcore
from kdcore.testing import check_logit_loss, random_logits, random_targets, value_and_grad
from kdcore_nkd import normalized_nontarget_term, target_term

IGNORE = -100
F64 = torch.float64


# ---------------------------------------------------------------- reference
def softmax_row(z, T):
    """Plain float64 softmax of one row, written out (``-inf`` gives 0)."""
    m = max(float(v.detach()) for v in z if torch.isfinite(v))
    e = [torch.exp((v - m) / T) if torch.isfinite(v) else torch.zeros((), dtype=F64) for v in z]
    total = sum(e)
    return [x / total for x in e]


def rho_row(z, t, T):
    """Teacher/student non-target distribution over classes != t, at T."""
    p = softmax_row(z, T)
    rest = sum(p[k] for k in range(len(p)) if k != t)
    return [p[k] / rest for k in range(len(p)) if k != t]


def ce_terms(p, q):
    return -sum((pk * torch.log(qk) for pk, qk in zip(p, q) if pk > 0), torch.zeros((), dtype=F64))


def kl_terms(p, q):
    return sum((pk * torch.log(pk / qk) for pk, qk in zip(p, q) if pk > 0), torch.zeros((), dtype=F64))


def rkl_terms(p, q):
    return kl_terms(q, p)


def reference_nkd(zs, zt, y, T, gamma, nontarget=ce_terms):
    """Mean over kept rows of -p_t log q_t (T=1) + gamma T^2 nontarget(rho^t, rho^s)."""
    c = zs.shape[-1]
    zs, zt, y = zs.reshape(-1, c), zt.reshape(-1, c), y.reshape(-1)
    total, count = torch.zeros((), dtype=F64), 0
    for i in range(zs.shape[0]):
        t = int(y[i])
        if t == IGNORE:
            continue
        p_t = softmax_row(list(zt[i]), 1.0)[t]
        q_t = softmax_row(list(zs[i]), 1.0)[t]
        first = -p_t * torch.log(q_t) if p_t > 0 else torch.zeros((), dtype=F64)
        second = nontarget(rho_row(list(zt[i]), t, T), rho_row(list(zs[i]), t, T))
        total = total + first + gamma * T * T * second
        count += 1
    return total / max(count, 1)


def teacher_entropy(zt, y, T):
    """Mean over kept rows of H(rho^t)."""
    rows = [ce_terms(r, r) for r in (rho_row(list(zt[i].double()), int(y[i]), T)
                                     for i in range(len(y)) if int(y[i]) != IGNORE)]
    return sum(rows) / len(rows)


def with_reference_grad(zs, zt, y, **kw):
    return value_and_grad(reference_nkd, zs.double(), zt.detach().double(), y, **kw)


def assert_close(a, b, rtol=2e-5, atol=2e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("T,gamma", [(1.0, 1.5), (2.0, 1.0), (4.0, 0.5), (0.5, 0.0), (1.0, 3.0)])
def test_matches_reference_flat(T, gamma):
    zs, zt, y = random_logits(9, 7, seed=1), random_logits(9, 7, seed=2), random_targets(9, classes=7)
    loss = kdcore.create("loss", "nkd", gamma=gamma, temperature=T)
    value, grad = value_and_grad(loss, zs, zt, y)
    ref_value, ref_grad = with_reference_grad(zs, zt, y, T=T, gamma=gamma)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)


def test_defaults():
    loss = kdcore.create("loss", "nkd")
    assert (loss.gamma, loss.temperature, loss.divergence) == (1.5, 1.0, None)


def test_matches_reference_tokens_with_ignored_positions():
    zs, zt = random_logits(3, 5, 11, seed=5), random_logits(3, 5, 11, seed=6)
    y = random_targets(3, 5, classes=11, ignore_frac=0.3)
    y[1, 2] = IGNORE
    loss = kdcore.create("loss", "nkd", gamma=1.5, temperature=2.0)
    value, grad = value_and_grad(loss, zs, zt, y)
    ref_value, ref_grad = with_reference_grad(zs, zt, y, T=2.0, gamma=1.5)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)
    assert torch.all(grad[y == IGNORE] == 0)


def test_target_term_stays_at_temperature_one():
    """gamma = 0 leaves -p_t log q_t at T = 1 whatever the temperature."""
    zs, zt, y = random_logits(6, 5, seed=7), random_logits(6, 5, seed=8), random_targets(6, classes=5)
    a = kdcore.create("loss", "nkd", gamma=0.0, temperature=4.0)(zs, zt, y)
    b = kdcore.create("loss", "nkd", gamma=0.0, temperature=1.0)(zs, zt, y)
    p_t = torch.softmax(zt.double(), -1).gather(1, y[:, None])
    log_q_t = torch.log_softmax(zs.double(), -1).gather(1, y[:, None])
    assert_close(a, b)
    assert_close(a, -(p_t * log_q_t).mean())


# ---------------------------------------------------------------- divergence option
def test_kl_divergence_same_gradients_value_minus_teacher_entropy():
    """CE(rho^t, rho^s) = KL(rho^t || rho^s) + H(rho^t): same student gradients."""
    zs, zt, y = random_logits(8, 6, seed=9), random_logits(8, 6, seed=10), random_targets(8, classes=6)
    T, gamma = 2.0, 1.5
    v_ce, g_ce = value_and_grad(kdcore.create("loss", "nkd", gamma=gamma, temperature=T), zs, zt, y)
    v_kl, g_kl = value_and_grad(kdcore.create("loss", "nkd", gamma=gamma, temperature=T, divergence="kl"),
                                zs, zt, y)
    assert_close(g_ce, g_kl)
    assert_close(v_ce - v_kl, gamma * T * T * teacher_entropy(zt, y, T))


class Hellinger:
    """A custom divergence object: sum_k (sqrt p_k - sqrt q_k)^2."""

    def __call__(self, teacher_logp, student_logp):
        return ((0.5 * teacher_logp).exp() - (0.5 * student_logp).exp()).pow(2).sum(-1)


def hellinger_terms(p, q):
    return sum((torch.sqrt(pk) - torch.sqrt(qk)) ** 2 for pk, qk in zip(p, q))


@pytest.mark.parametrize("divergence,terms", [
    ("rkl", rkl_terms), ({"name": "rkl"}, rkl_terms), ("kl", kl_terms), (Hellinger(), hellinger_terms),
])
def test_divergence_replaces_the_nontarget_term(divergence, terms):
    zs, zt, y = random_logits(7, 6, seed=11), random_logits(7, 6, seed=12), random_targets(7, classes=6)
    loss = kdcore.create("loss", "nkd", gamma=2.0, temperature=3.0, divergence=divergence)
    value, grad = value_and_grad(loss, zs, zt, y)
    ref_value, ref_grad = with_reference_grad(zs, zt, y, T=3.0, gamma=2.0, nontarget=terms)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)


# ---------------------------------------------------------------- extremes, padded columns, transforms
def test_confident_teacher_nontarget_is_exact():
    """p_t = 1 in float32 (1 - p_t underflows) but rho^t is exact."""
    zs, zt, y = random_logits(6, 7, seed=13), random_logits(6, 7, seed=14), random_targets(6, classes=7)
    zt[torch.arange(6), y] = 200.0
    loss = kdcore.create("loss", "nkd", gamma=1.0)
    value, grad = value_and_grad(loss, zs, zt, y)
    ref_value, ref_grad = with_reference_grad(zs, zt, y, T=1.0, gamma=1.0)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)


def test_padded_columns_match_reference():
    zs, zt, y = random_logits(6, 9, seed=15), random_logits(6, 9, seed=16), random_targets(6, classes=6)
    zs[:, 6:] = zt[:, 6:] = float("-inf")
    value, grad = value_and_grad(kdcore.create("loss", "nkd", temperature=2.0), zs, zt, y)
    ref_value, _ = with_reference_grad(zs[:, :6], zt[:, :6], y, T=2.0, gamma=1.5)
    assert_close(value, ref_value)
    assert torch.isfinite(grad).all() and torch.all(grad[:, 6:] == 0)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_teacher_transform_applies_to_both_terms(T):
    """A teacher-only temperature transform of 2 equals teacher logits / 2,
    in the target term (T = 1) and in the non-target term (T)."""
    zs, zt, y = random_logits(5, 6, seed=21), random_logits(5, 6, seed=22), random_targets(5, classes=6)
    loss = kdcore.create("loss", "nkd", temperature=T, transforms=[{"name": "temperature", "temperature": 2.0}])
    assert_close(loss(zs, zt, y), reference_nkd(zs.double(), zt.double() / 2, y, T=T, gamma=1.5))


# ---------------------------------------------------------------- the public pieces
def test_target_term_is_zero_and_safe_where_teacher_has_no_mass():
    log_pt = torch.tensor([float("-inf"), -0.5], requires_grad=True)
    log_qt = torch.tensor([float("-inf"), -2.0], requires_grad=True)
    value = target_term(log_pt, log_qt)
    assert value[0] == 0 and abs(value[1].item() - 2.0 * torch.tensor(-0.5).exp().item()) < 1e-6
    value.sum().backward()
    assert torch.isfinite(log_pt.grad).all() and torch.isfinite(log_qt.grad).all()


def test_normalized_nontarget_term_default_is_cross_entropy():
    a = torch.log_softmax(random_logits(4, 5, seed=23), -1)
    b = torch.log_softmax(random_logits(4, 5, seed=24), -1)
    assert_close(normalized_nontarget_term(a, b), -(a.exp() * b).sum(-1))
    assert_close(normalized_nontarget_term(a, b, lambda p, q: (p - q).sum(-1)), (a - b).sum(-1))


# ---------------------------------------------------------------- call conventions
@pytest.mark.parametrize("params", [{}, {"temperature": 2.0, "gamma": 0.5},
                                    {"temperature": 3.0, "divergence": "rkl"}])
def test_follows_the_logit_loss_conventions(params):
    """kdcore.testing: token level == flat, -100 positions, bf16 inputs, chunking."""
    check_logit_loss(kdcore.create("loss", "nkd", **params))
