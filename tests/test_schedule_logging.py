"""``weight/<term>`` in a run's logs is the weight a step trained with: the step the line
logs (steps.jsonl), the epoch's last step (metrics.jsonl), never the schedule at ``fraction == 1``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import kdcore

_spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).with_name("helpers_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("max_steps", [0, 20])
def test_logged_weights_are_those_steps_trained_with(tmp_path, max_steps):
    conf = runs.teacher_config(epochs=2)
    conf["run"].update(log_every=1, max_steps=max_steps)
    conf["loss"] = [{"name": "ce", "schedule": {"name": "linear", "start": 0.25, "end": 0.0}}]
    kdcore.train(conf, tmp_path / "run", quiet=True)
    steps, epochs = _lines(tmp_path / "run" / "steps.jsonl"), _lines(tmp_path / "run" / "metrics.jsonl")
    per_epoch = sum(1 for r in steps if r["epoch"] == 1)
    span = 2 * per_epoch  # the linear schedule runs over the run's epochs

    def linear(step_taken: int) -> float:  # the schedule at Progress.step == step_taken, written out
        return 0.25 + (0.0 - 0.25) * min(step_taken / span, 1.0)

    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    for r in steps:
        assert r["weight/ce"] == pytest.approx(linear(r["step"] - 1), abs=1e-12)
    assert [r["step"] for r in epochs] == [per_epoch, len(steps)]
    for r in epochs:
        assert r["weight/ce"] == pytest.approx(linear(r["step"] - 1), abs=1e-12)
    assert epochs[-1]["weight/ce"] > 0.0  # the run's last step trained with a positive weight
