"""DistributedDataParallel on the CPU (gloo): 2 ranks with half the batch each
end with the same weights as 1 process with the full batch."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch

import kdcore

_spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).with_name("helpers_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_two_gloo_ranks_equal_one_process(tmp_path):
    kdcore.train(runs.teacher_config(epochs=1), tmp_path / "t", quiet=True)
    conf = runs.student_config(str(tmp_path / "t" / "checkpoints" / "best.pt"), epochs=2, device="cpu")
    conf["student"]["dropout"] = 0.0  # dropout masks differ per rank by design
    path = tmp_path / "s.toml"
    path.write_text(tomli_w.dumps(conf))
    kdcore.train(path, tmp_path / "one", quiet=True)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "kdcore", "train", str(path),
                          "--out", str(tmp_path / "two"), "--quiet"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    assert one["step"] == two["step"]
    for k, v in one["model"].items():
        torch.testing.assert_close(two["model"][k], v, rtol=1e-4, atol=1e-5)
    assert not torch.equal(one["model"]["net.1.weight"], torch.load(
        tmp_path / "t" / "checkpoints" / "best.pt", weights_only=True)["model"]["net.1.weight"][:8])
