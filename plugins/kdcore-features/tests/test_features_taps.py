"""Default taps exist for every zoo model and the tv ResNets, resolve to modules, and
give features the losses accept (skipped without kdcore-vision)."""

from __future__ import annotations

import pytest
import torch

import kdcore
from kdcore.engine.taps import Tapping
from kdcore_features import Taps, default_taps

zoo = pytest.importorskip("kdcore_vision.zoo", reason="kdcore-vision is not installed (default zoo taps)")
ZOO = sorted(zoo.CIFAR_MODELS)


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_has_default_taps_matching_its_features(name):
    model = kdcore.create("backbone", name, num_classes=10).eval()
    taps = default_taps(model)
    modules = dict(model.named_modules())
    assert taps.stages and all(p in modules for p in [*taps.stages, taps.pooled])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), Tapping(model, [*taps.stages, taps.pooled]) as feats:
        _, features = model(x, return_features=True)
    # the stages are the backbone's own stage maps after the stem; the pooled tap averages to its pooled vector
    assert [tuple(feats[p].shape) for p in taps.stages] == [tuple(f.shape) for f in features.stages[1:]]
    assert torch.allclose(feats[taps.pooled].mean((2, 3)), features.pooled, atol=1e-5)


def test_torchvision_resnet_taps():
    model = kdcore.create("backbone", "tv.resnet18", num_classes=10)
    assert default_taps(model) == Taps(["net.layer1", "net.layer2", "net.layer3", "net.layer4"], "net.layer4")


def test_torchvision_probe_taps():
    pytest.importorskip("torchvision")
    model = kdcore.create("backbone", "tv.mobilenet_v2", num_classes=10)
    taps = default_taps(model)
    assert taps.stages and all(p.startswith("net.features.") for p in taps.stages)


def test_own_feature_taps_attribute_and_unknown_models():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(kdcore.ConfigError, match="no default feature taps.*student_layers"):
        default_taps(net)
    net.feature_taps = {"stages": ["0", "1"], "pooled": "1"}
    assert default_taps(net) == Taps(["0", "1"], "1")


@pytest.mark.parametrize("student,teacher", [("resnet8x4", "resnet32x4"), ("wrn_16_2", "wrn_40_2"),
                                             ("vgg8", "vgg13"), ("mobilenetv2", "vgg13"),
                                             ("shufflenetv1", "resnet32x4"), ("shufflenetv2", "resnet32x4")])
@pytest.mark.parametrize("loss_name", ["fitnet", "at", "sp", "pkt", "relational", "vid", "crd", "reviewkd"])
def test_losses_bind_and_run_on_zoo_pairs_without_naming_layers(student, teacher, loss_name):
    if loss_name in ("fitnet", "at", "vid") and student.startswith(("shufflenet", "mobilenet")):
        pytest.skip("stage sizes of this cross-family pair differ (name the layers)")
    s = kdcore.create("backbone", student, num_classes=10)
    t = kdcore.create("backbone", teacher, num_classes=10).eval()
    loss = kdcore.create("loss", loss_name, **({"num_data": 8, "num_negatives": 16} if loss_name == "crd" else {}))
    loss.bind(s, t)
    x = torch.randn(4, 3, 32, 32)
    with Tapping(s, loss.student_taps) as fs:
        zs = s(x)
    with torch.no_grad(), Tapping(t, loss.teacher_taps) as ft:
        zt = t(x)
    idx = torch.arange(4)
    value = loss(kdcore.Outputs(zs, features=fs, index=idx), kdcore.Outputs(zt, features=ft, index=idx),
                 torch.arange(4))
    assert value.dim() == 0 and torch.isfinite(value)


# -- a tap keeps the module's output when the model overwrites it in place ---------------------------
def test_a_tap_before_an_inplace_relu_keeps_the_modules_output():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(inplace=True))
    x = torch.randn(8, 4)
    expected = x @ model[0].weight.detach().t() + model[0].bias.detach()
    assert (expected < 0).any()  # the in-place ReLU changes these
    with Tapping(model, ["0"]) as feats:
        out = model(x)
    assert torch.equal(feats["0"], expected) and torch.equal(out, expected.clamp(min=0))
    feats["0"].sum().backward()  # d/dW of sum(W x + b) is the column sums of x for every row: no ReLU mask
    assert torch.allclose(model[0].weight.grad, x.sum(0).expand(6, 4))


def test_wrn_taps_reach_the_pre_activation_features():
    """On wrn_16_2 (eval), ``post.0`` is the final BatchNorm before the in-place ReLU, and
    ``stages.{1,2}.0.pre.0`` the BatchNorm of the next stage's input: the pre-activation
    features ReviewKD's reference reads from a WRN teacher (``bn(f_1)``, ``bn(f_2)``, ``bn(f_3)``)."""
    model = kdcore.create("backbone", "wrn_16_2", num_classes=10).eval()
    for m in model.modules():  # non-trivial statistics, so that BN is no identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    paths = ["stages.0", "stages.1", "stages.2", "stages.1.0.pre.0", "stages.2.0.pre.0", "post.0", "post"]
    with torch.no_grad(), Tapping(model, paths) as feats:
        model(torch.randn(2, 3, 32, 32))
        assert torch.equal(feats["post.0"], model.post[0](feats["stages.2"])) and (feats["post.0"] < 0).any()
        assert torch.equal(feats["post"], feats["post.0"].clamp(min=0))
        assert torch.equal(feats["stages.1.0.pre.0"], model.stages[1][0].pre[0](feats["stages.0"]))
        assert torch.equal(feats["stages.2.0.pre.0"], model.stages[2][0].pre[0](feats["stages.1"]))
