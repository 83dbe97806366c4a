"""kdcore.losses.functional.exp: exp(scale * x) through exp2 on the CPU, checked
against float64 exp (and the special values) on every range the losses meet."""

import math

import pytest
import torch

from kdcore.losses.functional import exp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("lo", "hi"), [(-1.0, 1.0), (-20.0, 0.0), (-87.0, 0.0), (0.0, 80.0)])
@pytest.mark.parametrize("scale", [1.0, 0.25, 3.0])
def test_exp_matches_float64_exp(dtype, lo, hi, scale):
    x = torch.empty(1000, dtype=dtype).uniform_(lo / scale, hi / scale, generator=torch.Generator().manual_seed(0))
    want = torch.exp(x.double() * scale)
    got = exp(x, scale)
    assert got.dtype == dtype
    eps = torch.finfo(dtype).eps
    # the product's rounding: a relative error of about |scale x| eps, plus exp2's
    # own and the rounding of the reference's own product
    bound = 2 * (x.double().abs() * scale + 1) * eps
    assert ((got.double() - want).abs() <= bound * want).all()


def test_exp_subnormal_results_and_special_values():
    x = torch.tensor([-90.0, -100.0, -103.0, -200.0, float("-inf"), 0.0, float("inf"), float("nan")])
    got = exp(x)
    assert got[:3].gt(0).all()  # subnormal float32 results are kept, not flushed
    # as torch.exp gives them, to the subnormals' coarser resolution
    torch.testing.assert_close(got[:3], torch.exp(x[:3]), rtol=1e-4, atol=3e-45)
    assert got[3] == 0 and got[4] == 0 and got[5] == 1
    assert math.isinf(got[6]) and math.isnan(got[7])


def test_exp_out_and_in_place():
    x = torch.linspace(-5, 5, 11)
    want = torch.exp(x)
    out = torch.empty_like(x)
    assert exp(x, out=out) is out
    torch.testing.assert_close(out, want)
    y = x.clone()
    assert exp(y, 2.0, out=y) is y
    torch.testing.assert_close(y, torch.exp(2 * x))


def test_exp_under_autograd():
    x = torch.linspace(-3, 3, 7, dtype=torch.float64, requires_grad=True)
    exp(x, 0.5).sum().backward()
    torch.testing.assert_close(x.grad, 0.5 * torch.exp(0.5 * x.detach()))
