"""``tv.*`` backbones: every torchvision classifier is registered; the feature interface works."""

from __future__ import annotations

import os

import pytest
import torch
from torchvision import models

import kdcore
from kdcore_vision.torchvision_models import CLASSIFIERS, last_per_resolution

# (name, input size, options): one cheap member of each structural family
FAMILIES = [
    ("resnet18", 32, {}), ("mobilenet_v3_small", 32, {}), ("squeezenet1_1", 48, {}),
    ("shufflenet_v2_x0_5", 32, {}), ("regnet_x_400mf", 32, {}), ("googlenet", 32, {}),
    ("mnasnet0_5", 32, {}), ("efficientnet_b0", 32, {}),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_every_torchvision_classifier_is_registered():
    names = models.list_models(module=models)
    assert len(names) > 50
    assert {f"tv.{n}" for n in names} <= set(kdcore.available("backbone"))
    # the written-out list is the installed torchvision's (update CLASSIFIERS after an upgrade)
    assert sorted(CLASSIFIERS) == sorted(names)


@pytest.mark.parametrize("name,size,options", FAMILIES)
def test_logits_and_features(name, size, options):
    torch.manual_seed(0)
    model = kdcore.create("backbone", f"tv.{name}", num_classes=3, **options)
    x = torch.randn(2, 3, size, size)
    logits, feats = model(x, return_features=True)  # train mode: GoogLeNet must give plain logits
    assert logits.shape == (2, 3)
    assert len(feats.stages) >= 3 and all(s.dim() == 4 and s.shape[0] == 2 for s in feats.stages)
    sizes = [s.shape[-1] for s in feats.stages]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert feats.pooled.dim() == 2 and feats.pooled.shape[0] == 2
    logits.sum().backward()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, return_features=True)[0])


def test_pretrained_weights_are_refused():
    with pytest.raises(kdcore.ConfigError, match="weights"):
        kdcore.create("backbone", "tv.resnet18", num_classes=3, weights="DEFAULT")


def test_unknown_option_is_a_config_error():
    with pytest.raises(kdcore.ConfigError, match="tv.resnet18"):
        kdcore.create("backbone", "tv.resnet18", num_classes=3, no_such_option=1)


def test_state_dict_loads_into_the_torchvision_model():
    model = kdcore.create("backbone", "tv.mobilenet_v3_small", num_classes=3)
    reference = models.mobilenet_v3_small(num_classes=3)
    model.net.load_state_dict(reference.state_dict())


def test_last_per_resolution_keeps_the_last_map_of_each_size():
    maps = [torch.zeros(1, c, h, h) for c, h in [(1, 8), (2, 8), (3, 4), (4, 2), (5, 2)]]
    assert [m.shape[1] for m in last_per_resolution(maps + [torch.zeros(1, 5)])] == [2, 3, 5]


@pytest.mark.skipif(not os.environ.get("KDCORE_VISION_ALL_TV"), reason="slow: set KDCORE_VISION_ALL_TV=1")
def test_every_torchvision_model_builds_and_gives_features():
    for name in models.list_models(module=models):
        size = 224 if name.startswith("maxvit") else 96 if name.startswith("inception") else 64
        if name.startswith("vit_"):  # vit_{size}_{patch}: two patches per side
            size = 2 * int(name.rsplit("_", 1)[1])
        opts = {"image_size": size} if name.startswith("vit_") else {}
        model = kdcore.create("backbone", f"tv.{name}", num_classes=3, **opts).eval()
        with torch.no_grad():
            logits, feats = model(torch.randn(2, 3, size, size), return_features=True)
        assert logits.shape == (2, 3) and feats.pooled.shape[0] == 2 and feats.stages, name
        del model
