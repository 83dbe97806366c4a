"""Backbone hf from a local directory whose weights are damaged: one config-error line naming
the damaged file and what to do (never safetensors' bare SafetensorError)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import tomli_w
import torch

import kdcore
from kdcore.cli.commands import main
from kdcore_lm.hf import hf

spec = importlib.util.spec_from_file_location("helpers_lm", Path(__file__).with_name("helpers_lm.py"))
H = importlib.util.module_from_spec(spec)
spec.loader.exec_module(H)

TODO = "; download the model again or re-save it with save_pretrained"


def saved(directory: Path, **kw) -> Path:
    torch.manual_seed(0)
    hf(num_classes=50, config=dict(H.TINY["llama"])).model.save_pretrained(directory, **kw)
    return directory


def damaged_line(file: Path, prefix: str = "path: ") -> str:
    """The expected message as a pattern: exact but for safetensors' own reason in parentheses."""
    return re.escape(f"{prefix}{file} is damaged (") + r"Error while deserializing header: [^\n()]+" \
        + re.escape(")" + TODO)


def test_a_truncated_model_file_is_one_line_through_the_cli(tmp_path, capsys):
    model = saved(tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    conf = {"run": {"seed": 0, "epochs": 1, "batch_size": 8, "progress": "off"},
            "data": {"name": "synthetic_lm", "n": 32, "length": 8, "vocab_size": 50, "states": 2},
            "student": {"backbone": "hf", "path": str(model)},
            "optim": {"name": "adamw", "lr": 1e-3}, "loss": [{"name": "ce"}]}
    (tmp_path / "run.toml").write_text(tomli_w.dumps(conf))
    capsys.readouterr()  # save_pretrained's progress bar
    code = main(["train", str(tmp_path / "run.toml"), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert re.fullmatch("kdcore: error: " + damaged_line(weights, "student.path: ") + "\n", err), err


def test_an_overwritten_header_names_the_file(tmp_path):
    model = saved(tmp_path / "model")
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:24] = b"\x00" * 16  # the start of the JSON header
    weights.write_bytes(bytes(data))
    with pytest.raises(kdcore.ConfigError) as info:
        hf(num_classes=50, path=str(model))
    assert re.fullmatch(damaged_line(weights), str(info.value)), str(info.value)


def test_a_damaged_shard_or_index_names_that_file(tmp_path):
    model = saved(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = model / "model.safetensors.index.json"
    good_index = index.read_text()
    index.write_text(good_index[:-10])  # cut short: not JSON
    with pytest.raises(kdcore.ConfigError) as info:
        hf(num_classes=50, path=str(model))
    assert str(info.value).startswith(f"path: {index} is damaged (") and str(info.value).endswith(TODO)
    index.write_text(good_index)
    shards[1].write_bytes(shards[1].read_bytes()[:100])
    with pytest.raises(kdcore.ConfigError) as info:
        hf(num_classes=50, path=str(model))
    assert re.fullmatch(damaged_line(shards[1]), str(info.value)), str(info.value)


def test_a_damaged_file_it_cannot_find_names_the_directory(tmp_path, monkeypatch):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    model = saved(tmp_path / "model")

    def damaged(*args, **kwargs):
        raise SafetensorError("Error while deserializing header: header too small")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", damaged)
    with pytest.raises(kdcore.ConfigError) as info:
        hf(num_classes=50, path=str(model))
    assert str(info.value) == f"path: a weights file of {model} is damaged (Error while deserializing header: " \
                              f"header too small){TODO}"
