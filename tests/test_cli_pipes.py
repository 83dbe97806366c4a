"""The command line with a closed standard output or error (``kdcore list loss | head -1``):
the command finishes, exits 0, and prints no BrokenPipeError.

Each test gives the command a real pipe whose reader has left before the command
writes (the read end is closed before it starts), so every write meets the closed
pipe, not only those that come after a reader's timing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

_spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).with_name("helpers_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)


def kdcore_to_closed_pipe(*args, stderr_too=False, unbuffered=False):
    """``kdcore ARGS`` with stdout (and stderr with ``stderr_too``) a pipe nobody reads;
    returns the exit status and, unless it went to the pipe, stderr. Buffered, stdout meets
    the closed pipe when it is flushed at the end; ``unbuffered``, at the first print."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    read, write = os.pipe()
    os.close(read)
    try:
        out = subprocess.run([sys.executable, "-m", "kdcore", *args], stdout=write,
                             stderr=write if stderr_too else subprocess.PIPE, text=True, env=env, timeout=300)
    finally:
        os.close(write)
    return out.returncode, out.stderr


@pytest.mark.parametrize("args, unbuffered", [
    (("list", "loss"), False), (("list", "loss"), True), (("plugins",), False), (("--help",), False)])
def test_output_to_a_closed_pipe_exits_0_without_a_traceback(args, unbuffered):
    code, err = kdcore_to_closed_pipe(*args, unbuffered=unbuffered)
    assert (code, err) == (0, "")


def _teacher_run(tmp_path) -> Path:
    conf = runs.teacher_config(epochs=1)
    conf["run"]["progress"] = "lines"  # progress lines on stderr
    path = tmp_path / "t.toml"
    path.write_text(tomli_w.dumps(conf))
    return path


def assert_complete(out: Path) -> None:
    """``out`` holds a whole run: summary, metrics, both checkpoints, TensorBoard events."""
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "checkpoints" / "best.pt").is_file()
    assert list((out / "tb").glob("events.*"))


def test_train_with_a_closed_stdout_writes_its_run_and_exits_0(tmp_path):
    code, err = kdcore_to_closed_pipe("train", str(_teacher_run(tmp_path)), "--out", str(tmp_path / "o"))
    assert code == 0
    assert err.startswith("epoch 1/1 ") and len(err.splitlines()) == 1  # the progress line, nothing else
    assert_complete(tmp_path / "o")


def test_train_whose_progress_goes_to_a_closed_pipe_writes_its_run_and_exits_0(tmp_path):
    code, _ = kdcore_to_closed_pipe("train", str(_teacher_run(tmp_path)), "--out", str(tmp_path / "o"),
                                    stderr_too=True)
    assert code == 0
    assert_complete(tmp_path / "o")
