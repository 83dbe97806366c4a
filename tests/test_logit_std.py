"""The ``logit_std`` transform (Sun et al., CVPR 2024, "Logit Standardization in
Knowledge Distillation") against a float64 reference written from the paper's
Z-score, in every loss that takes transforms and with every divergence."""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given, settings

import kdcore
from kdcore.plugins import default_registry
from kdcore.testing import assert_finite_with_grads, check_transform, extreme_batches
from kdcore.testing import testing_params as params_of

EPS = 1e-7


def z_score(z: torch.Tensor) -> torch.Tensor:
    """The paper's Z-score in float64: ``(z - mean(z)) / (std(z) + eps)`` per row, ``std`` with Bessel's
    correction (the authors' ``torch.std``) over the finite columns; ``-inf`` stays."""
    z = z.double()
    real = torch.isfinite(z)
    n = real.sum(-1, keepdim=True).double()
    x = torch.where(real, z, 0.0)
    mean = x.sum(-1, keepdim=True) / n
    dev = torch.where(real, x - mean, 0.0)
    std = (dev.square().sum(-1, keepdim=True) / (n - 1)).sqrt()
    return torch.where(real, dev / (std + EPS), float("-inf"))


def kd_reference(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(Z(t) / T) || softmax(Z(s) / T))`` per row, mean over kept rows."""
    p = torch.softmax(z_score(t) / temperature, -1)
    log_q = torch.log_softmax(z_score(s) / temperature, -1)
    log_p = torch.log_softmax(z_score(t) / temperature, -1)
    rows = temperature ** 2 * torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
    keep = y.reshape(-1) != -100
    return rows.reshape(-1)[keep].mean()


def logits(*shape: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g) + 5.0 * torch.randn(*shape[:-1], 1, generator=g)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_with_logit_std_is_the_contract_identity(temperature):
    s, t = logits(8, 10, seed=0), logits(8, 10, seed=1)
    y = torch.tensor([0, 3, -100, 9, 2, -100, 5, 1])
    loss = kdcore.create("loss", "kd", temperature=temperature, transforms=[{"name": "logit_std"}])
    torch.testing.assert_close(loss(s.double(), t.double(), y), kd_reference(s, t, y, temperature),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss(s, t, y).double(), kd_reference(s, t, y, temperature), rtol=2e-5, atol=1e-7)


def test_token_level_inputs_with_ignored_positions_and_chunks():
    s, t = logits(2, 5, 11, seed=2), logits(2, 5, 11, seed=3)
    y = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(4))
    y[0, 1] = y[1, 3] = y[1, 4] = -100
    ref = kd_reference(s.reshape(-1, 11), t.reshape(-1, 11), y, 2.0)
    for chunk_size in (None, 3):
        loss = kdcore.create("loss", "kd", temperature=2.0, chunk_size=chunk_size, transforms=["logit_std"])
        torch.testing.assert_close(loss(s.double(), t.double(), y), ref, rtol=1e-10, atol=1e-12)


def test_padded_columns_are_not_classes():
    s, t = logits(4, 7, seed=5), logits(4, 7, seed=6)
    s[:, 5:] = t[:, 5:] = float("-inf")
    y = torch.tensor([0, 1, 2, 3])
    loss = kdcore.create("loss", "kd", temperature=2.0, transforms=["logit_std"])
    torch.testing.assert_close(loss(s.double(), t.double(), y), kd_reference(s[:, :5], t[:, :5], y, 2.0),
                               rtol=1e-10, atol=1e-12)
    out = kdcore.create("transform", "logit_std")(torch.log_softmax(t, -1), None)
    assert torch.isneginf(out[:, 5:]).all() and torch.isfinite(out[:, :5]).all()


def test_the_convention_bessel_corrected_std_plus_eps_and_the_base_temperature():
    z = logits(3, 6, seed=7).double()
    out = kdcore.create("transform", "logit_std")(z, None)
    torch.testing.assert_close(out.mean(-1), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.std(-1), torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)
    warm = kdcore.create("transform", "logit_std", temperature=2.5)(z, None)
    torch.testing.assert_close(warm, z_score(z) / 2.5, rtol=1e-12, atol=1e-12)


def test_constant_rows_give_zero_with_finite_gradients():
    z = torch.tensor([[0.3] * 5, [1e38] * 5, [-7.0] * 4 + [float("-inf")]], requires_grad=True)
    out = kdcore.create("transform", "logit_std")(z, None)
    assert torch.equal(out[:, :4], torch.zeros(3, 4)) and torch.isneginf(out[2, 4])
    out[:, :4].sum().backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e20, 1e38])
def test_float32_logits_up_to_1e38_stay_finite_and_match_the_reference(scale):
    unit = torch.rand(4, 6, generator=torch.Generator().manual_seed(8)) * 2 - 1
    z = (unit * scale).requires_grad_()
    out = kdcore.create("transform", "logit_std")(z, None)
    assert torch.isfinite(out).all()
    out.square().mul(torch.arange(6.0)).sum().backward()
    assert torch.isfinite(z.grad).all()
    torch.testing.assert_close(out.double(), z_score(z.detach().double()), rtol=1e-4, atol=1e-5)


def test_conformance_and_shift_invariance():
    check_transform(kdcore.create("transform", "logit_std"))
    check_transform(kdcore.create("transform", "logit_std", temperature=3.0))


def test_the_conformance_check_catches_a_transform_that_is_not_shift_invariant():
    class Shifty:
        side = "both"
        shift_invariant = True
        testing_skips = ("normalised",)

        def __call__(self, logp, target=None):
            return logp * 2.0  # (logp + c) * 2 is not logp * 2

    with pytest.raises(AssertionError, match="shift invariance"):
        check_transform(Shifty())


def _transform_losses() -> list[str]:
    """Every registered loss that takes ``transforms`` and a teacher."""
    reg = default_registry()
    names = []
    for name in reg.available("loss"):
        factory = reg.get("loss", name).factory
        try:
            accepted = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            continue
        if "transforms" in accepted and getattr(factory, "uses_teacher", True):
            names.append(name)
    return names


def _divergence_losses() -> list[str]:
    reg = default_registry()
    return [n for n in _transform_losses() if "divergence" in inspect.signature(reg.get("loss", n).factory).parameters]


def _loss_cases() -> list[tuple[str, dict]]:
    cases = [(name, {}) for name in _transform_losses()]
    cases += [(name, {"divergence": {"name": d, **params_of("divergence", d)}})
              for name in _divergence_losses() for d in default_registry().available("divergence")]
    return cases


def test_the_losses_of_the_method_are_covered():
    assert {"kd", "dkd", "nkd", "tand", "abkd"} <= set(_transform_losses())
    assert {"kd", "dkd", "nkd", "tand"} <= set(_divergence_losses())


@pytest.mark.parametrize(("name", "extra"), _loss_cases(),
                         ids=[f"{n}-{e['divergence']['name']}" if e else n for n, e in _loss_cases()])
def test_every_loss_with_logit_std_is_the_loss_on_z_scored_logits(name, extra):
    params = {**params_of("loss", name), **extra}
    with_std = kdcore.create("loss", name, transforms=[{"name": "logit_std"}], **params)
    plain = kdcore.create("loss", name, **params)
    s, t = logits(6, 8, seed=9), logits(6, 8, seed=10)
    y = torch.tensor([1, 0, -100, 7, 4, 2])
    torch.testing.assert_close(with_std(s.double(), t.double(), y), plain(z_score(s), z_score(t), y),
                               rtol=1e-8, atol=1e-10)
    assert_finite_with_grads(with_std, s, t, y)


@settings(max_examples=40, deadline=None)
@given(batch=extreme_batches())
def test_kd_with_logit_std_is_finite_on_extreme_float32_inputs(batch):
    s, t, y = batch
    assert_finite_with_grads(kdcore.create("loss", "kd", temperature=4.0, transforms=["logit_std"]), s, t, y)
