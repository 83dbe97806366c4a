"""examples/two_teachers.toml (a ResNet and an MLP teacher, one MLP student on digits) runs
end to end after its teachers are trained as its comments say (shortened to one epoch)."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import kdcore

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE = EXAMPLES / "two_teachers.toml"


def _teacher_commands() -> list[list[str]]:
    """The ``kdcore train`` commands of the example's comments that train its teachers."""
    lines = [line.removeprefix("#").strip() for line in EXAMPLE.read_text().splitlines()]
    return [shlex.split(line)[2:] for line in lines if line.startswith("kdcore train examples/vision_digits")]


def test_the_two_teacher_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = _teacher_commands()
    assert len(commands) == 2
    for args in commands:
        overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"] + ["run.epochs=1"]
        out = args[args.index("--out") + 1]
        kdcore.train(EXAMPLES / Path(args[0]).name, out, overrides, quiet=True)
    summary = kdcore.train(EXAMPLE, "runs/two_teachers", ["run.epochs=1"], quiet=True)
    assert math.isfinite(summary["test_acc"]) and set(summary["teachers"]) == {"resnet", "mlp"}
    assert all(math.isfinite(summary["final"][f"loss/{k}"]) for k in ("ce", "dkd", "fitnet", "kd"))
    assert summary["teachers"]["mlp"]["test_acc"] > 0.5
