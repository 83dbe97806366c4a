"""Checkpoint verification: what checking a checkpoint before use costs, against a
plain ``torch.load`` of the same file in the same run.

kdcore reads every checkpoint through ``kdcore.engine.checkpoint_file.read_checkpoint``,
which streams every member of the zip archive through ``zlib.crc32`` and compares
it with the CRC-32 that ``torch.save`` stored (``torch.load`` does not), then calls
``torch.load(weights_only=True)``; on ``--resume`` ``last.pt``'s weights are also
checked to be finite (``kdcore.engine.checkpoints.non_finite``). The script writes
a checkpoint of ``--gib`` GiB of float32 tensors with kdcore's writer, reads it
once so that it is in the page cache, then times, interleaved and alternating
which goes first, median over ``--reps``:

- ``torch.load``: ``torch.load(path, map_location="cpu", weights_only=True)``;
- ``verify``: the CRC-32 check of every member alone;
- ``read_checkpoint``: kdcore's whole read (the check, then the same ``torch.load``);
- ``non_finite``: the finiteness check of the loaded tensors.

It prints seconds, seconds per GB (10^9 bytes of file) and the ratios to
``torch.load``. The goal is under 1 s per GB for ``verify`` with the file in the
page cache.

    .venv/bin/python benchmarks/bench_checkpoint_verify.py [--gib 1.0] [--tensors 16]
        [--reps 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdcore.common.files import atomic_torch_save
from kdcore.engine.checkpoint_file import read_checkpoint, verify_members
from kdcore.engine.checkpoints import non_finite


def write_checkpoint(path: Path, gib: float, tensors: int) -> int:
    """A kdcore-style checkpoint of ``gib`` GiB of float32 tensors; returns its size in bytes."""
    per = int(gib * 2**30) // 4 // tensors
    generator = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(per, generator=generator) for i in range(tensors)}
    atomic_torch_save({"model": state, "epoch": 1, "step": 1}, path)
    return path.stat().st_size


def warm(path: Path) -> None:
    """Read the file once so that every case finds it in the page cache."""
    with path.open("rb", buffering=0) as f:
        while f.read(1 << 24):
            pass


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "last.pt"
        size = write_checkpoint(path, args.gib, args.tensors)
        warm(path)
        cases = {
            "torch.load": lambda: torch.load(path, map_location="cpu", weights_only=True),
            "verify": lambda: verify_members(path),
            "read_checkpoint": lambda: read_checkpoint(path),
        }
        times: dict[str, list[float]] = {name: [] for name in (*cases, "non_finite")}
        for rep in range(args.reps):
            order = list(cases) if rep % 2 == 0 else list(reversed(cases))
            for name in order:
                seconds, state = timed(cases[name])
                times[name].append(seconds)
                if name == "torch.load":
                    start = time.perf_counter()
                    assert non_finite(state["model"]) is None
                    times["non_finite"].append(time.perf_counter() - start)
                state = None  # free the loaded tensors before the next case
    gb = size / 1e9
    base = statistics.median(times["torch.load"])
    print(f"checkpoint: {size / 2**30:.3f} GiB ({args.tensors} tensors), in the page cache; "
          f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; median of {args.reps}")
    print(f"{'case':<16} {'s':>8} {'s/GB':>8} {'/ torch.load':>13}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<16} {median:8.3f} {median / gb:8.3f} {median / base:13.2f}")


if __name__ == "__main__":
    main()
