"""DIST against a float64 reference written from the paper's equations
(Huang et al. 2022, sec. 3), on flat and token-level inputs with ignored
positions, its batch coupling, the conventions of kdcore.testing and
finiteness on extreme inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import kdcore
from kdcore.testing import (assert_finite_with_grads, check_logit_loss, extreme_batches, random_logits,
                            random_targets)


def rho(u: np.ndarray, v: np.ndarray) -> float:
    """Pearson's correlation coefficient of two vectors (numpy, float64)."""
    return float(np.corrcoef(u, v)[0, 1])


def softmax(z: np.ndarray, t: float) -> np.ndarray:
    e = np.exp(z / t - (z / t).max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference(zs: torch.Tensor, zt: torch.Tensor, t: float = 1.0, beta: float = 1.0, gamma: float = 1.0) -> float:
    """beta * L_inter + gamma * L_intra with L_inter = T^2 / B sum_i (1 - rho(Y^s_i, Y^t_i))
    and L_intra = T^2 / C sum_j (1 - rho(Y^s_:j, Y^t_:j)), in float64."""
    ys, yt = softmax(zs.double().numpy(), t), softmax(zt.double().numpy(), t)
    b, c = ys.shape
    inter = sum(1 - rho(ys[i], yt[i]) for i in range(b)) / b
    intra = sum(1 - rho(ys[:, j], yt[:, j]) for j in range(c)) / c
    return t * t * (beta * inter + gamma * intra)


@pytest.mark.parametrize(("t", "beta", "gamma"), [(1.0, 1.0, 1.0), (4.0, 2.0, 2.0), (2.0, 0.5, 0.0)])
def test_value_equals_the_reference(t, beta, gamma):
    zs, zt = random_logits(9, 6, seed=1), random_logits(9, 6, seed=2)
    loss = kdcore.create("loss", "dist", temperature=t, beta=beta, gamma=gamma)
    assert loss(zs.double(), zt.double()).item() == pytest.approx(reference(zs, zt, t, beta, gamma), rel=1e-10)
    assert loss(zs, zt).item() == pytest.approx(reference(zs, zt, t, beta, gamma), rel=1e-5)


def test_token_level_drops_the_ignored_positions():
    zs, zt = random_logits(3, 5, 7, seed=3), random_logits(3, 5, 7, seed=4)
    y = random_targets(3, 5, classes=7, seed=5, ignore_frac=0.4)
    y[0, :2] = 1
    kept = y != -100
    loss = kdcore.create("loss", "dist", temperature=4.0)
    assert loss(zs, zt, y).item() == pytest.approx(reference(zs[kept], zt[kept], 4.0), rel=1e-5)
    s = zs.clone().requires_grad_()
    loss(s, zt, y).backward()
    assert torch.all(s.grad[~kept] == 0) and s.grad[kept].abs().sum() > 0


def test_the_intra_class_relation_couples_the_rows():
    """Changing one sample changes the loss's gradient on another (a per-row loss's would not move)."""
    zs, zt = random_logits(6, 5, seed=6), random_logits(6, 5, seed=7)
    other = zs.clone()
    other[5] = random_logits(5, seed=8)

    def grad_of_row0(student, gamma):
        s = student.clone().requires_grad_()
        kdcore.create("loss", "dist", gamma=gamma)(s, zt).backward()
        return s.grad[0]

    assert not torch.allclose(grad_of_row0(zs, 1.0), grad_of_row0(other, 1.0))
    torch.testing.assert_close(grad_of_row0(zs, 0.0), grad_of_row0(other, 0.0))  # inter-class alone: per row


def test_perfect_agreement_gives_zero():
    z = random_logits(8, 5, seed=9)
    assert kdcore.create("loss", "dist")(z, z).item() == pytest.approx(0.0, abs=1e-6)


def test_chunk_size_and_bad_weights_are_config_errors():
    with pytest.raises(kdcore.ConfigError, match="chunk_size: DIST is a batch-level loss"):
        kdcore.create("loss", "dist", chunk_size=8)
    with pytest.raises(kdcore.ConfigError, match="beta"):
        kdcore.create("loss", "dist", beta=-1.0)


def test_follows_the_logit_loss_conventions():
    check_logit_loss(kdcore.create("loss", "dist", temperature=2.0))


@settings(max_examples=40, deadline=None)
@given(batch=extreme_batches())
def test_finite_with_finite_gradients_on_extreme_inputs(batch):
    assert_finite_with_grads(kdcore.create("loss", "dist", temperature=4.0), *batch)


def test_a_confident_teacher_keeps_the_teacher_gradient_finite():
    """Tiny probabilities (about 1e-25) in a class column across the batch: their centred
    squared norm would underflow in float32 without the rescaling in pearson()."""
    inf = float("inf")
    zs = torch.tensor([[0.0, 1.0, -inf], [1.0, 1.0, -inf]])
    zt = torch.tensor([[230.0, 0.0, -inf], [230.0, 30.0, -inf]])
    assert_finite_with_grads(kdcore.create("loss", "dist", temperature=4.0), zs, zt, torch.tensor([0, 0]))
