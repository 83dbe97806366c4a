"""The vision components through the kdcore engine: a tiny offline distillation run."""

from __future__ import annotations

import json

import pytest
import torch

import kdcore

engine = pytest.importorskip("kdcore.engine")


@pytest.mark.parametrize("speed", [{}, {"amp": "bf16", "channels_last": True}], ids=["fp32", "bf16_cl"])
def test_digits_distillation_run(tmp_path, speed):
    teacher = kdcore.create("backbone", "resnet14", num_classes=10)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = engine.train({
            "run": {"seed": 0, "epochs": 1, "batch_size": 128, "device": "cpu", "progress": "off",
                    **speed},
            "data": {"name": "digits", "image_size": 8, "split": [0.5, 0.25, 0.25]},
            "teacher": {"backbone": "resnet14", "checkpoint": str(tmp_path / "teacher.pt")},
            "student": {"backbone": "resnet8"},
            "optim": {"name": "sgd", "lr": 0.05},
            "loss": [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9, "temperature": 4.0}],
        }, out_dir=tmp_path / "run", quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["steps"] == 8
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss/ce", "loss/kd", "val_acc"} <= set(record)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
