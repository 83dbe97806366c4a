"""Appendix A.1 of PTLoss paper: KL, label smoothing (eq. 27) and focal loss
(eq. 14) as PTLoss coefficient choices, generalised to C classes."""

import math

import torch

import kdcore
from kdcore_ptloss.functional import ptloss_rows

kdcore.reload_plugins()

ORDERS = [5, 20, 80, 320]


def rows(seed, n=16, c=4):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.log_softmax(torch.randn(n, c, generator=g, dtype=torch.float64), -1)
    student = torch.log_softmax(0.5 * torch.randn(n, c, generator=g, dtype=torch.float64), -1)
    return teacher, student


def test_zero_coefficients_are_kl():
    teacher, student = rows(0)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    torch.testing.assert_close(ptloss_rows(teacher, student, torch.zeros(3, dtype=torch.float64)), kl)


def test_label_smoothing_eq27():
    """eps_{c,m} = (delta / m) (1 / (C p_c) - 1): PTLoss-M(p, q) tends to
    KL(p_ls || q) + sum p log p - sum p_ls log p_ls, p_ls = (1 - delta) p + delta / C."""
    delta = 0.2
    teacher, logits = rows(1)
    logits = logits.clone().requires_grad_(True)
    student = torch.log_softmax(logits, -1)
    p = teacher.exp()
    c = p.shape[-1]
    p_ls = (1 - delta) * p + delta / c
    target = (p_ls * (p_ls.log() - student)).sum(-1) + (p * p.log()).sum(-1) - (p_ls * p_ls.log()).sum(-1)
    (grad_target,) = torch.autograd.grad(target.sum(), logits, retain_graph=True)
    errors, grad_errors = [], []
    for order in ORDERS:
        m = torch.arange(1, order + 1, dtype=torch.float64)
        eps = (delta / m) * (1.0 / (c * p) - 1.0)[..., None]            # [n, C, M]
        value = ptloss_rows(teacher, student, eps)
        (grad,) = torch.autograd.grad(value.sum(), logits, retain_graph=True)
        errors.append((value - target).abs().max().item())
        grad_errors.append((grad - grad_target).abs().max().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert all(a > b for a, b in zip(grad_errors, grad_errors[1:])), grad_errors
    assert errors[-1] < 1e-8 and grad_errors[-1] < 1e-8


def test_focal_eq14():
    """eps_{c,m} = ((1 - q_c)^gamma - 1) / m: PTLoss-M tends to the focal
    distillation loss of eq. 12, sum p log p + sum_c p_c (1 - q_c)^gamma (-log q_c)."""
    teacher, student = rows(2)
    p, q = teacher.exp(), student.exp()
    for gamma in (0.5, 2.0):
        focal = (p * teacher).sum(-1) + (p * (1 - q) ** gamma * -student).sum(-1)
        errors = []
        for order in ORDERS:
            m = torch.arange(1, order + 1, dtype=torch.float64)
            eps = (((1 - q) ** gamma - 1)[..., None]) / m
            errors.append((ptloss_rows(teacher, student, eps) - focal).abs().max().item())
        assert all(a > b for a, b in zip(errors, errors[1:])), errors
        assert errors[-1] < 1e-8


def test_maclaurin_series_of_log():
    """Eq. 4: eps_m = -1/m cancels the first M terms of -log q, so the
    perturbation is sum_m -(1 - q)^m / m and PTLoss-M tends to sum p log p as
    the order grows (the student's log-likelihood term is removed)."""
    teacher, student = rows(3)
    p = teacher.exp()
    errors = []
    for order in ORDERS:
        eps = -1.0 / torch.arange(1, order + 1, dtype=torch.float64)
        errors.append((ptloss_rows(teacher, student, eps) - (p * teacher).sum(-1)).abs().max().item())
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-8
    assert not math.isnan(errors[0])


def test_label_smoothing_table_through_the_loss():
    """For one teacher row, eq. 27 is a C x M table: the registered ``ptloss``
    with it trains like ``kd`` on the label-smoothed teacher (same gradient)."""
    delta, c = 0.1, 5
    teacher_logits = torch.tensor([[1.0, 0.5, -0.3, 0.2, -1.0]]).expand(6, -1)
    student = torch.randn(6, c, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    p = torch.softmax(teacher_logits[0].double(), -1)
    m = torch.arange(1, 401, dtype=torch.float64)
    table = ((delta / m) * (1.0 / (c * p) - 1.0)[:, None]).tolist()
    pt = kdcore.create("loss", "ptloss", eps=table)(student, teacher_logits)
    (g_pt,) = torch.autograd.grad(pt, student)
    ls = kdcore.create("loss", "kd", temperature=1.0, transforms=[{"name": "label_smoothing", "delta": delta}])
    (g_ls,) = torch.autograd.grad(ls(student, teacher_logits), student)
    torch.testing.assert_close(g_pt, g_ls, rtol=0, atol=1e-5)
