"""DistributedDataParallel on the CPU (gloo): 2 ranks with half the batch each
end with the same weights as 1 process with the full batch."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
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
    """The weights, the logged step losses and the epochs' means of them (ranks keep
    different numbers of labelled rows: a third of the rows are unlabelled) and one
    ``done:`` line, from rank 0 only."""
    kdcore.train(runs.teacher_config(epochs=1), tmp_path / "t", quiet=True)
    conf = runs.student_config(str(tmp_path / "t" / "checkpoints" / "best.pt"), epochs=2, device="cpu",
                               log_every=1)
    conf["student"]["dropout"] = 0.0  # dropout masks differ per rank by design
    conf["data"]["unlabelled"] = 180
    path = tmp_path / "s.toml"
    path.write_text(tomli_w.dumps(conf))
    kdcore.train(path, tmp_path / "one", quiet=True)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "kdcore", "train", str(path),
                          "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(out.stdout.splitlines()) == 1 and out.stdout.startswith("done: student test_acc "), out.stdout
    assert [line[:10] for line in out.stderr.splitlines() if line.startswith("epoch ")] == ["epoch 1/2 ", "epoch 2/2 "]
    steps = [[json.loads(line) for line in (tmp_path / run / "steps.jsonl").read_text().splitlines()]
             for run in ("one", "two")]
    assert len(steps[0]) == len(steps[1]) == json.loads((tmp_path / "one" / "summary.json").read_text())["steps"]
    for a, b in zip(*steps):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for k in (k for k in a if k.startswith("loss/")):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)
    epochs = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    assert len(epochs[0]) == len(epochs[1]) == 2
    for a, b in zip(*epochs):  # the epoch's means of the steps' values on the whole batch
        for k in (k for k in a if k.startswith("loss/")):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["epoch"], k)
    one = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    assert one["step"] == two["step"]
    for k, v in one["model"].items():
        torch.testing.assert_close(two["model"][k], v, rtol=1e-4, atol=1e-5)
    assert not torch.equal(one["model"]["net.1.weight"], torch.load(
        tmp_path / "t" / "checkpoints" / "best.pt", weights_only=True)["model"]["net.1.weight"][:8])


TORCHRUN = Path(sys.executable).parent / "torchrun"
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None,
                                    reason="torchrun not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lone_rank(tmp_path, port: int, *overrides: str, command: str = "train") -> subprocess.Popen:
    """``kdcore train`` (or ``kdcore capture``, of a teacher never reached) as rank 0 of a
    2-process job whose rank 1 never starts."""
    path = tmp_path / "t.toml"
    conf = runs.teacher_config(epochs=1)
    if command == "capture":
        conf["teacher"] = {"backbone": "mlp", "checkpoint": str(tmp_path / "teacher.pt")}
    path.write_text(tomli_w.dumps(conf))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    args = [a for o in overrides for a in ("--set", o)]
    return subprocess.Popen([sys.executable, "-m", "kdcore", command, str(path), "--out", str(tmp_path / "run"),
                             "--quiet", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(("env", "message"), [
    ({"WORLD_SIZE": "2", "RANK": "5"},
     "RANK: 5 in the environment is out of range, must be from 0 to 1 as WORLD_SIZE=2 (launch with torchrun, "
     "which sets it, or unset WORLD_SIZE to run one process)"),
    ({"WORLD_SIZE": "2"},
     "RANK: not set in the environment while WORLD_SIZE=2 (launch with torchrun, which sets it, or unset "
     "WORLD_SIZE to run one process)"),
    ({"WORLD_SIZE": "two", "RANK": "0"},
     "WORLD_SIZE: 'two' in the environment is not an integer (launch with torchrun, which sets it, or unset "
     "WORLD_SIZE to run one process)"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "-1"},
     "LOCAL_RANK: -1 in the environment is out of range, must be from 0 to 1 as WORLD_SIZE=2 (launch with "
     "torchrun, which sets it, or unset WORLD_SIZE to run one process)"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_PORT": "http"},
     "MASTER_PORT: 'http' in the environment is not an integer (launch with torchrun, which sets it, or unset "
     "WORLD_SIZE to run one process)"),
])
def test_a_bad_torchrun_environment_is_one_line_before_any_rendezvous(tmp_path, monkeypatch, capsys, env, message):
    from kdcore.cli.commands import main

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "t.toml"
    path.write_text(tomli_w.dumps(runs.teacher_config(epochs=1)))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert capsys.readouterr().err == f"kdcore: error: {message}\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("value", "message"), [(0, "must be > 0, got 0.0"), (math.inf, "must be finite, got inf")])
def test_the_rendezvous_timeout_must_be_finite_and_positive(tmp_path, value, message):
    conf = runs.teacher_config(epochs=1)
    conf["run"]["dist_timeout_s"] = value
    with pytest.raises(kdcore.ConfigError) as exc:
        kdcore.train(conf, tmp_path / "run", quiet=True)
    assert str(exc.value) == f"run.dist_timeout_s: {message}"


def _wait_listening(port: int, rank: subprocess.Popen) -> None:
    """Wait until rank 0 listens on ``port`` (it hosts the rendezvous there, then waits for its
    peers) or exits."""
    deadline = time.monotonic() + 120
    while rank.poll() is None and time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)


def test_sigterm_ends_a_rank_waiting_for_its_peers(tmp_path):
    port = _free_port()
    rank = _lone_rank(tmp_path, port)
    try:
        _wait_listening(port, rank)
        assert rank.poll() is None, rank.communicate()[1]
        rank.send_signal(signal.SIGTERM)
        _, err = rank.communicate(timeout=20)  # the rendezvous' own timeout is 300 s
    finally:
        rank.kill()
    assert rank.returncode == 143
    assert err == "kdcore: terminated by SIGTERM (a training run continues with --resume)\n"


@pytest.mark.parametrize("command", ["train", "capture"])
def test_a_rank_whose_peers_never_come_fails_after_the_timeout_key(tmp_path, command):
    rank = _lone_rank(tmp_path, _free_port(), "run.dist_timeout_s=2", command=command)
    _, err = rank.communicate(timeout=120)
    assert rank.returncode == 1
    assert re.fullmatch(r"kdcore: failed: the 2 processes of the job did not all join within "
                        r"run\.dist_timeout_s = 2 s \(rank 0: [^\n]+\); start every rank, or raise "
                        r"run\.dist_timeout_s\n", err), err


#: a 2-rank job ended through kdcore's console script (``kdcore.cli.commands.run``) after a
#: command that leaves rank 0's last all-reduce unfinished: rank 1 joins it only once rank 0's
#: process is ending, so a gloo worker of rank 0 runs Python code (a callback of the all-reduce)
#: as that process ends; in an interpreter that is finalizing, CPython stops such a thread
#: inside C++ code that must not unwind, and the process aborts
EXIT_RACE = '''
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import kdcore.cli.commands as commands
from kdcore.engine import distributed

MARKS = Path(sys.argv[1])


def ended(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class Finalizing:
    """Collected when rank 0's interpreter finalizes: holds the finalization open, the GIL
    released, until rank 1 has reduced."""

    def __init__(self):
        self.marks, self.clock = MARKS, time  # module globals are gone when it is collected

    def __del__(self):
        (self.marks / "finalizing").touch()
        deadline = self.clock.monotonic() + 30
        while not (self.marks / "reduced").exists() and self.clock.monotonic() < deadline:
            self.clock.sleep(0.01)
        self.clock.sleep(1.0)


def command():
    job = distributed.setup("cpu", 60)
    if job.rank == 0:
        (MARKS / "pid").write_text(str(os.getpid()))
        work = dist.all_reduce(torch.ones(1), async_op=True)
        work.get_future().then(lambda fut: None)
        return 0
    while not (MARKS / "pid").exists():
        time.sleep(0.01)
    peer, deadline = int((MARKS / "pid").read_text()), time.monotonic() + 60
    while not (MARKS / "finalizing").exists() and not ended(peer) and time.monotonic() < deadline:
        time.sleep(0.01)
    if (MARKS / "finalizing").exists():
        dist.all_reduce(torch.ones(1))
        (MARKS / "reduced").touch()
    return 0


sentinel = Finalizing() if os.environ["RANK"] == "0" else None
commands.main = command
commands.run()
'''


@needs_torchrun
def test_a_gloo_worker_still_running_python_as_a_rank_ends_does_not_abort_it(tmp_path):
    script, marks = tmp_path / "exit_race.py", tmp_path / "marks"
    script.write_text(EXIT_RACE)
    marks.mkdir()
    out = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(script), str(marks)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "without an active exception" not in out.stderr  # std::terminate's abort at exit
    # rank 0 ended with its all-reduce pending, and without finalizing its interpreter
    assert (marks / "pid").exists() and not (marks / "finalizing").exists()


THREADS_AFTER_TRAIN = '''
import os
import sys

import kdcore

kdcore.train(sys.argv[1], sys.argv[2], quiet=True)
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
with open(f"{sys.argv[3]}/rank{os.environ['RANK']}.txt", "w") as f:  # one file a rank: no interleaving
    f.write(f"rank {os.environ['RANK']} gloo threads {sum(n.startswith(('pt_gloo', 'gloo')) for n in names)}")
'''


@needs_torchrun
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_a_ddp_run_leaves_no_process_group_threads_behind(tmp_path):
    """``kdcore.train`` drops the DDP model before it leaves the group, and nothing else keeps
    the group: its worker threads are joined by the time ``train`` returns."""
    conf = runs.teacher_config(epochs=1)
    conf["run"].update(device="cpu", max_steps=3)
    path, script = tmp_path / "t.toml", tmp_path / "threads.py"
    path.write_text(tomli_w.dumps(conf))
    script.write_text(THREADS_AFTER_TRAIN)
    out = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(script), str(path),
                          str(tmp_path / "run"), str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert seen == ["rank 0 gloo threads 0", "rank 1 gloo threads 0"]
