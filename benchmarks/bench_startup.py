"""Start-up time of the cheap ``kdcore`` commands against ``python -c "import torch"``.

A plugin host's command line should cost little beyond torch itself: for each
command (``--help``, ``list``, ``list loss``, ``plugins``) it runs the command
and the baseline as fresh processes, interleaved (alternating which goes
first), and prints the median wall time of each and the median of the per-pair
ratios command / baseline (goal <= 1.1).

    .venv/bin/python benchmarks/bench_startup.py [--reps 9]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

BASELINE = [sys.executable, "-c", "import torch"]
COMMANDS = {"--help": ["--help"], "list": ["list"], "list loss": ["list", "loss"], "plugins": ["plugins"]}


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {args.reps} interleaved pairs per command (fresh processes)")
    print(f"{'command':12} {'kdcore s':>9} {'torch s':>8} {'ratio':>6}")
    for label, cli_args in COMMANDS.items():
        cmd = [sys.executable, "-m", "kdcore", *cli_args]
        wall(cmd), wall(BASELINE)  # warm the file cache
        ours, base = [], []
        for i in range(args.reps):
            pair = [(ours, cmd), (base, BASELINE)]
            for times, c in pair if i % 2 == 0 else pair[::-1]:
                times.append(wall(c))
        ratio = statistics.median(a / b for a, b in zip(ours, base))
        print(f"{label:12} {statistics.median(ours):9.2f} {statistics.median(base):8.2f} {ratio:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
