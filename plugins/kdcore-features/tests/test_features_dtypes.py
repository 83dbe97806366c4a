"""Every registered feature loss in float64 without casting it first: the connectors it
creates on its first call follow the features' dtype and device (a loss cast with
``.double()`` before its first call would hide a connector that does not)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kdcore
from kdcore.engine.taps import Tapping
from kdcore.testing import TinyConvNet, check_outputs_loss, components
from kdcore.testing import testing_params as params_for

FEATURE_LOSSES = components("loss", plugin="features")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def outputs(model, paths, x):
    with Tapping(model, paths) as feats:
        logits = model(x)
    return kdcore.Outputs(logits, features=feats, index=torch.arange(x.shape[0], device=x.device))


def test_the_registry_has_every_feature_loss():
    assert FEATURE_LOSSES == ["at", "crd", "fitnet", "pkt", "relational", "reviewkd", "sp", "uskd", "vid"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", FEATURE_LOSSES)
def test_float64_features_without_casting_the_loss(name, device):
    loss = kdcore.create("loss", name, **params_for("loss", name)).to(device)  # moved, as the engine does
    student = TinyConvNet(5, width=4, seed=0).double().to(device)
    teacher = TinyConvNet(5, width=6, seed=1).double().to(device).eval() if loss.uses_teacher else None
    loss.bind(student, teacher)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(device)
    y = torch.tensor([0, 1, 2, 3], device=device)

    def value():
        with torch.no_grad():
            t = outputs(teacher, loss.teacher_taps, x) if teacher is not None else None
        return loss(outputs(student, loss.student_taps, x), t, y)

    with torch.no_grad():
        value()  # the engine's shape-inference pass creates the connectors
    v = value()
    v.backward()
    assert v.dtype == torch.float64 and torch.isfinite(v)
    assert {(p.dtype, p.device.type) for p in loss.parameters()} <= {(torch.float64, device)}
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float64 for g in grads)


class LazyHint(nn.Module):
    """A hint loss whose connector is a ``torch.nn.LazyLinear``: created float32 whatever the features."""

    uses_outputs = True
    student_taps, teacher_taps = ["stages.2"], ["stages.2"]

    def __init__(self):
        super().__init__()
        self.connector = nn.LazyLinear(24)

    def forward(self, student, teacher, target):
        return (self.connector(student.features["stages.2"].mean((2, 3))) - teacher.features["stages.2"].mean((2, 3))
                ).pow(2).mean()


def test_the_float64_check_catches_a_connector_left_in_float32():
    check_outputs_loss(LazyHint(), skip=["float64"])  # in float32 the term is fine
    with pytest.raises(AssertionError, match=r"^float64 features, the term's lazy connectors not cast: "
                                             r"mat1 and mat2 must have the same dtype"):
        check_outputs_loss(LazyHint())
