"""``kdcore demo``: the main job on the embedded default, offline.

Trains a teacher on ``gaussian_mixture``, then distils a smaller student with
``ce`` alone and with ``ce`` plus every installed logit distillation loss
(default parameters), and prints test accuracy and the mean total-variation
distance to the exact Bayes posterior for each.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch

from kdcore.errors import ConfigError
from kdcore.losses import LogitLoss
from kdcore.plugins import default_registry

TEACHER: dict[str, Any] = {
    "run": {"seed": 0, "epochs": 10, "batch_size": 64, "progress": "off", "threads": 1},
    "data": {"name": "gaussian_mixture"},
    "student": {"backbone": "mlp", "hidden": [128, 128]},
    "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
    "loss": [{"name": "ce"}],
}

STUDENT: dict[str, Any] = {
    "run": {"seed": 1, "epochs": 6, "batch_size": 64, "progress": "off", "threads": 1},
    "data": {"name": "gaussian_mixture"},
    "student": {"backbone": "mlp", "hidden": [16]},
    "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.0},
    "loss": [{"name": "ce"}],
}


def distillation_losses(registry) -> list[tuple[str, str | None]]:
    """``(name, reason to skip or None)`` for every registered logit loss that uses a teacher."""
    out = []
    for name in registry.available("loss"):
        comp = registry.get("loss", name)
        factory = comp.factory
        if not (isinstance(factory, type) and issubclass(factory, LogitLoss) and factory.uses_teacher):
            continue
        try:
            registry.create("loss", name)
            out.append((name, None))
        except (ConfigError, TypeError) as exc:
            out.append((name, f"needs parameters ({exc})"))
    return out


def bayes_accuracy(split) -> float:
    return float((split.posterior.argmax(-1) == split.targets).float().mean())


def run_demo(out_dir: str | Path = "runs/demo", *, teacher_epochs: int | None = None,
             student_epochs: int | None = None, quiet: bool = False) -> list[dict[str, Any]]:
    """Run the demo and return one row per method (also printed as a table)."""
    from kdcore.engine import train

    registry = default_registry()
    out = Path(out_dir)
    say = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    teacher_cfg = copy.deepcopy(TEACHER)
    if teacher_epochs:
        teacher_cfg["run"]["epochs"] = teacher_epochs
    say(f"[demo] training the teacher (mlp {teacher_cfg['student']['hidden']}) -> {out / 'teacher'}")
    t_summary = train(teacher_cfg, out / "teacher", quiet=True, registry=registry)
    ckpt = str((out / "teacher" / "checkpoints" / "best.pt").resolve())

    data = registry.create("dataset", "gaussian_mixture")
    rows = [{"method": "bayes posterior", "test_acc": bayes_accuracy(data.test), "test_tv": 0.0},
            {"method": "teacher", "test_acc": t_summary["test_acc"], "test_tv": t_summary.get("test_tv")}]
    methods: list[tuple[str, str | None]] = [("ce", None)] + distillation_losses(registry)
    for name, skip in methods:
        if skip:
            say(f"[demo] skipping {name}: {skip}")
            continue
        conf = copy.deepcopy(STUDENT)
        if student_epochs:
            conf["run"]["epochs"] = student_epochs
        if name != "ce":
            conf["teacher"] = {"backbone": "mlp", "hidden": TEACHER["student"]["hidden"], "checkpoint": ckpt}
            conf["loss"].append({"name": name})
        say(f"[demo] student with {'ce only' if name == 'ce' else 'ce + ' + name}")
        summary = train(conf, out / f"student-{name}", quiet=True, registry=registry)
        rows.append({"method": "ce" if name == "ce" else f"ce + {name}",
                     "test_acc": summary["test_acc"], "test_tv": summary.get("test_tv")})
    print(format_table(rows))
    print(f"\nruns and TensorBoard logs: {out}  (tensorboard --logdir {out})")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    width = max(len(r["method"]) for r in rows)
    lines = [f"{'method':<{width}}  test acc  TV to Bayes", f"{'-' * width}  --------  -----------"]
    for r in rows:
        tv = "" if r["test_tv"] is None else f"{r['test_tv']:.4f}"
        lines.append(f"{r['method']:<{width}}  {r['test_acc']:8.4f}  {tv:>11}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    run_demo()
