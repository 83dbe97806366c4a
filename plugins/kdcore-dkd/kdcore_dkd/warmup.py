"""The ``dkd_warmup`` time schedule: the DKD paper's warm-up of its loss weight.

Zhao et al. (2022) scale the DKD term by ``min(epoch / E, 1)`` with epochs
counted from 1 and ``E = 20`` (methods.md, dkd). It is registered as
``dkd_warmup`` because the general ``warmup`` schedule belongs to
kdcore-schedulers.
"""

from __future__ import annotations

from kdcore import params
from kdcore.schedule import Progress, TimeSchedule


class DKDWarmup(TimeSchedule):
    """``dkd_warmup``: multiplier ``min(epoch / epochs, 1)``, constant within an
    epoch (epoch 1 gives ``1 / epochs``; full weight from epoch ``epochs`` on)."""

    def __init__(self, epochs: int = 20):
        self.epochs = params.positive_int("epochs", epochs)

    def __call__(self, progress: Progress) -> float:
        return min(progress.epoch / self.epochs, 1.0)
