"""Built-in time schedules: ``fixed``, ``linear`` and ``warmup`` (multipliers of a term's weight)."""

from __future__ import annotations

from kdcore.common import params
from kdcore.losses.schedule import Progress, TimeSchedule


class Fixed(TimeSchedule):
    """``fixed``: the term's weight, unchanged (``value`` scales it)."""

    def __init__(self, value: float = 1.0):
        self.value = params.number("value", value)

    def __call__(self, progress: Progress) -> float:
        return self.value


class Linear(TimeSchedule):
    """``linear``: from ``start`` to ``end`` over the run (or its first ``epochs``
    epochs), step by step; ``end`` afterwards."""

    def __init__(self, start: float = 0.0, end: float = 1.0, epochs: int | None = None):
        self.start = params.number("start", start)
        self.end = params.number("end", end)
        self.epochs = params.positive_int("epochs", epochs, optional=True)

    def __call__(self, progress: Progress) -> float:
        span = (self.epochs or progress.epochs) * progress.steps_per_epoch
        frac = min(progress.step / max(span, 1), 1.0)
        return self.start + (self.end - self.start) * frac


class Warmup(TimeSchedule):
    """``warmup``: DKD's warm-up of a term's weight (Zhao et al. 2022, sec. 4;
    TAND paper sec. 3), ``min(epoch / epochs, 1)`` with epochs counted from 1:
    ``1 / epochs`` in the first epoch, full weight from epoch ``epochs`` on,
    constant within an epoch (as in the DKD authors' code)."""

    def __init__(self, epochs: int = 20):
        self.epochs = params.positive_int("epochs", epochs)

    def __call__(self, progress: Progress) -> float:
        return min(progress.epoch / self.epochs, 1.0)
