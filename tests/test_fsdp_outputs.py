"""Under FSDP the student must return its logits: a student that returns hidden
states and a head (the fused projection) is refused with a config error on every
rank (2 gloo processes), where it used to train to wrong weights silently. (A
student that returns logits is the FSDP test of tests/test_long_runs.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

TORCHRUN = Path(sys.executable).parent / "torchrun"


def _conf(fused: bool) -> dict:  # the test plugin's toy_lm: fused returns Outputs(hidden, head)
    return {"run": {"seed": 0, "epochs": 1, "batch_size": 12, "progress": "off", "device": "cpu",
                    "strategy": "fsdp", "max_steps": 2},
            "data": {"name": "toy_tokens"},
            "student": {"backbone": "toy_lm", "fused": fused},
            "optim": {"name": "sgd", "lr": 0.5},
            "loss": [{"name": "ce", "chunk_size": 4}]}


@pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun not installed")
def test_fsdp_refuses_a_student_without_logits(tmp_path, site):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    path = tmp_path / "fused.toml"
    path.write_text(tomli_w.dumps(_conf(True)))
    refused = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "kdcore", "train", str(path),
                              "--out", str(tmp_path / "out"), "--quiet"],
                             capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in refused.stderr.splitlines() if line.startswith("kdcore: error:")]
    assert refused.returncode != 0 and lines, refused.stderr[-3000:]
    assert all("student: under run.strategy = 'fsdp' the student must return its logits" in line for line in lines)
