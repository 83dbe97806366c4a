"""``ptloss`` and ``ptloss_proxy`` in a training run through the engine."""

import json
import math

import kdcore
from kdcore.cli import main

kdcore.reload_plugins()

BASE = {
    "run": {"seed": 0, "epochs": 1, "batch_size": 64, "progress": "off", "device": "cpu"},
    "data": {"name": "gaussian_mixture", "n": 600},
    "student": {"backbone": "mlp", "hidden": [16]},
    "optim": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0},
}


def test_teacher_search_and_students(tmp_path):
    kdcore.train({**BASE, "loss": [{"name": "ce"}]}, out_dir=tmp_path / "teacher", quiet=True)
    ckpt = str(tmp_path / "teacher" / "checkpoints" / "last.pt")
    (tmp_path / "run.toml").write_text(
        '[data]\nname = "gaussian_mixture"\nn = 600\n\n[teacher]\nbackbone = "mlp"\nhidden = [16]\n'
        f'checkpoint = "{ckpt}"\n\n[student]\nbackbone = "mlp"\n\n[[loss]]\nname = "ce"\n')
    assert main(["ptloss-search", "--config", str(tmp_path / "run.toml"), "--orders", "2", "--draws", "5",
                 "--no-progress", "--out", str(tmp_path / "eps.json")]) == 0
    eps = json.loads((tmp_path / "eps.json").read_text())["eps"]
    teacher = {"backbone": "mlp", "hidden": [16], "checkpoint": ckpt}
    for loss in ({"name": "ptloss", "eps": eps},
                 {"name": "kd", "temperature": 1.0, "transforms": [{"name": "ptloss_proxy", "eps": eps}]}):
        summary = kdcore.train({**BASE, "teacher": teacher, "loss": [loss]}, out_dir=tmp_path / loss["name"],
                               quiet=True)
        assert summary["test_acc"] > 0.4
        assert math.isfinite(summary["final"][f"loss/{loss['name']}"])
