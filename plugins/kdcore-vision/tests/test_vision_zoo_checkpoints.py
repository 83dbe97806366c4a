"""Reference-zoo (RepDistiller / mdistiller) state dicts: conversion and ``kdcore vision-import``."""

from __future__ import annotations

import pytest
import torch

import kdcore
from kdcore.cli import main
from kdcore_vision import CIFAR_MODELS, convert_zoo_state_dict


def reference_resnet_keys(blocks_per_stage: int, projection_in_first_stage: bool) -> list[str]:
    """Parameter and buffer names of RepDistiller's CIFAR ``ResNet`` (models/resnet.py), in order."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight", *[f"bn1.{b}" for b in bn]]
    for stage in (1, 2, 3):
        for j in range(blocks_per_stage):
            p = f"layer{stage}.{j}"
            keys += [f"{p}.conv1.weight", *[f"{p}.bn1.{b}" for b in bn],
                     f"{p}.conv2.weight", *[f"{p}.bn2.{b}" for b in bn]]
            if j == 0 and (stage > 1 or projection_in_first_stage):
                keys += [f"{p}.downsample.0.weight", *[f"{p}.downsample.1.{b}" for b in bn]]
    return keys + ["fc.weight", "fc.bias"]


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name,blocks,projection", [("resnet8", 1, False), ("resnet8x4", 1, True)])
def test_reference_names_convert_to_the_same_network(name, blocks, projection):
    source = randomised(kdcore.create("backbone", name, num_classes=10))
    values = list(source.state_dict().values())
    keys = reference_resnet_keys(blocks, projection)
    assert len(keys) == len(values)
    ckpt = {"epoch": 240, "accuracy": torch.tensor(79.4),  # RepDistiller's layout, saved under DataParallel
            "model": {f"module.{k}": v for k, v in zip(keys, values)}}
    converted = convert_zoo_state_dict(name, ckpt)
    model = kdcore.create("backbone", name, num_classes=10).eval()
    model.load_state_dict(converted)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))


@pytest.mark.parametrize("name", sorted(CIFAR_MODELS))
def test_every_zoo_model_round_trips_under_other_names_without_counters(name):
    with torch.device("meta"):
        state = kdcore.create("backbone", name, num_classes=100).state_dict()
    renamed = {f"m{i}.w": v for i, (k, v) in enumerate(state.items()) if not k.endswith("num_batches_tracked")}
    converted = convert_zoo_state_dict(name, renamed)
    assert list(converted) == list(state)
    assert all(converted[k].shape == state[k].shape for k in state)


def test_mismatches_are_config_errors():
    state = kdcore.create("backbone", "resnet8", num_classes=100).state_dict()
    with pytest.raises(kdcore.ConfigError, match="resnet14"):
        convert_zoo_state_dict("resnet14", state)
    wrong = {**state, "stem.0.weight": torch.zeros(16, 3, 5, 5)}
    with pytest.raises(kdcore.ConfigError, match=r"stem.0.weight has shape \(16, 3, 5, 5\)"):
        convert_zoo_state_dict("resnet8", wrong)
    with pytest.raises(kdcore.ConfigError, match="not a CIFAR zoo model"):
        convert_zoo_state_dict("tv.resnet18", state)


def test_import_command_writes_a_teacher_checkpoint(tmp_path, capsys):
    source = randomised(kdcore.create("backbone", "resnet8", num_classes=10))
    keys = reference_resnet_keys(1, False)
    torch.save({"model": dict(zip(keys, source.state_dict().values()))}, tmp_path / "ckpt_epoch_240.pth")
    out = tmp_path / "teacher.pt"
    assert main(["vision-import", str(tmp_path / "ckpt_epoch_240.pth"), "--backbone", "resnet8",
                 "--out", str(out)]) == 0
    assert "(78,042 parameters)" in capsys.readouterr().out  # resnet8, 10 classes
    model = kdcore.create("backbone", "resnet8", num_classes=10).eval()
    model.load_state_dict(torch.load(out, weights_only=True)["model"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    assert main(["vision-import", str(tmp_path / "missing.pth"), "--backbone", "resnet8", "--out", str(out)]) == 2
