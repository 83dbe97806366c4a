"""Interrupted runs, for testing that a component resumes exactly.

A trainable loss term or transform, a memory bank or a stateful schedule must
resume from ``checkpoints/last.pt`` to the same weights as a run that was never
stopped. :func:`train_interrupted` trains a config until ``at_epoch`` begins,
stops it as Ctrl-C would, and resumes it in the same run directory::

    kdcore.train(conf, tmp_path / "full", quiet=True)
    train_interrupted(conf, tmp_path / "cut", at_epoch=2)
    # compare the two runs' checkpoints/last.pt
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence

from kdcore.engine import loop, train


@contextlib.contextmanager
def _stop_at_epoch(epoch: int) -> Iterator[None]:
    original = loop._run_epoch

    def stop(trainer, *args):
        if trainer.epoch == epoch:
            raise KeyboardInterrupt
        return original(trainer, *args)

    loop._run_epoch = stop
    try:
        yield
    finally:
        loop._run_epoch = original


def train_interrupted(config: Any, run_dir: str | Path, overrides: Sequence[str] = (), *, at_epoch: int) -> None:
    """Train ``config`` into ``run_dir``, stopped as epoch ``at_epoch`` (1-based) begins, then resume it.

    The stop is a ``KeyboardInterrupt`` at the start of the epoch, after the
    previous epoch's checkpoint; the resumed run finishes every epoch.
    """
    with _stop_at_epoch(at_epoch):
        try:
            train(config, run_dir, list(overrides), quiet=True)
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError(f"the run ended before epoch {at_epoch} began; nothing was interrupted")
    train(config, run_dir, list(overrides), resume=True, quiet=True)
