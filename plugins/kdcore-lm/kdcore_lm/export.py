"""Write a local Hugging Face model directory's weights as a kdcore teacher checkpoint.

kdcore's engine loads a teacher's weights from ``[teacher] checkpoint``; until it
accepts a backbone that brings its own trained weights (``hf`` with ``path``),
a teacher from a local directory needs this one-off conversion::

    python -m kdcore_lm.export models/teacher models/teacher.pt [--dtype bfloat16]

and then ``[teacher] backbone = "hf"``, ``path = "models/teacher"``,
``checkpoint = "models/teacher.pt"`` (the same weights, in the layout of the
``hf`` backbone's state dict: ``model.<transformers key>``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdcore.common import atomic_torch_save
from kdcore.common.errors import ConfigError


def export(path: str, out: str, dtype: str = "auto", overwrite: bool = False) -> int:
    """Save ``{"model": state_dict}`` of the ``hf`` backbone loaded from ``path`` to ``out``,
    atomically; an existing ``out`` is replaced only with ``overwrite``. Returns the tensor count."""
    from kdcore_lm.hf import hf

    target = Path(out)
    if target.exists() and not overwrite:
        raise ConfigError(f"out: {out} exists; choose another file, or pass --overwrite to replace it")
    if not target.parent.is_dir():
        raise ConfigError(f"out: the directory {target.parent} does not exist; create it first")
    model = hf(path=path, dtype=dtype, check_head=False)
    state = model.state_dict()
    atomic_torch_save({"model": state}, target)
    return len(state)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdcore_lm.export", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a local transformers model directory")
    parser.add_argument("out", help="the checkpoint file to write (.pt)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the saved one)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint file")
    args = parser.parse_args(argv)
    try:
        n = export(args.path, args.out, args.dtype, args.overwrite)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {n} tensors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
