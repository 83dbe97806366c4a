"""Soak: consecutive 2-process ``torchrun`` runs on the CPU (gloo), a DDP run and an FSDP run
alternating, counting how many exit 0 (the goal: all of them, also under load).

Each run is ``torchrun --standalone --nproc_per_node=2 -m kdcore train`` of a small
supervised config (600 samples, an MLP, one epoch) as a user starts it; a failure is
reported with its exit status and the last line of its stderr (an abort after the
work was done shows as ``terminate called without an active exception``).
``--load N`` keeps N busy-looping processes running beside the runs, as other jobs
on a shared machine would.

    .venv/bin/python benchmarks/soak_distributed.py [--runs 20] [--load [N]] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

TORCHRUN = Path(sys.executable).parent / "torchrun"
STRATEGIES = ("ddp", "fsdp")


def write_config(work: Path, strategy: str) -> Path:
    """A config that trains in a few seconds on 2 CPU ranks with ``strategy``."""
    path = work / f"{strategy}.toml"
    path.write_text(tomli_w.dumps({
        "run": {"seed": 0, "epochs": 1, "batch_size": 32, "device": "cpu", "progress": "off",
                "strategy": strategy},
        "data": {"name": "gaussian_mixture", "n": 600},
        "student": {"backbone": "mlp", "hidden": [16]},
        "optim": {"name": "sgd", "lr": 0.1},
        "loss": [{"name": "ce"}],
    }))
    return path


@contextlib.contextmanager
def busy(count: int):
    """``count`` processes that keep a CPU core busy while the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def one_run(config: Path, out: Path) -> tuple[int, float, str]:
    """Exit status, seconds and the last stderr line of one 2-process run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "kdcore", "train",
                           str(config), "--out", str(out), "--quiet", "--overwrite"],
                          capture_output=True, text=True, env=env)
    lines = done.stderr.strip().splitlines()
    return done.returncode, time.perf_counter() - start, lines[-1] if lines else ""


def soak(runs: int, load: int, work: Path) -> int:
    """Run the soak; prints one line per failed run and a summary; the number that failed."""
    configs = {s: write_config(work, s) for s in STRATEGIES}
    ok = {s: 0 for s in STRATEGIES}
    total = {s: 0 for s in STRATEGIES}
    seconds = []
    with busy(load):
        for i in range(runs):
            strategy = STRATEGIES[i % len(STRATEGIES)]
            code, took, last = one_run(configs[strategy], work / f"run-{strategy}")
            total[strategy] += 1
            seconds.append(took)
            if code == 0:
                ok[strategy] += 1
            else:
                print(f"run {i + 1} ({strategy}): exit {code}: {last}", flush=True)
    good = sum(ok.values())
    per = ", ".join(f"{s} {ok[s]}/{total[s]}" for s in STRATEGIES)
    print(f"{good} of {runs} runs exited 0 ({per}); {statistics.median(seconds):.1f} s per run (median); "
          f"{load} busy process(es) beside them")
    return runs - good


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="consecutive 2-process runs (default 20)")
    parser.add_argument("--load", type=int, nargs="?", const=1, default=0,
                        help="busy-looping processes beside the runs (--load alone: 1)")
    parser.add_argument("--work", type=Path, help="directory for the configs and runs (default: a temporary one)")
    args = parser.parse_args()
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        return 1 if soak(args.runs, args.load, args.work) else 0
    with tempfile.TemporaryDirectory(prefix="kdcore-soak-") as work:
        return 1 if soak(args.runs, args.load, Path(work)) else 0


if __name__ == "__main__":
    sys.exit(main())
