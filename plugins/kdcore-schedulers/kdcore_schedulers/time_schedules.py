"""Time schedules: ``schedule(progress) -> multiplier`` of a loss term's ``weight``.

Epochs are counted from 1 (:class:`kdcore.losses.schedule.Progress`); schedules that
move step by step use ``progress.step`` (optimizer steps done before the
current one), so they change smoothly inside an epoch.

A milestone or switch epoch ``E`` means "the old value through epoch ``E``,
the new one from epoch ``E + 1``" (as PyTorch's ``MultiStepLR`` with epochs
counted from 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kdcore.common import params
from kdcore.common.errors import ConfigError
from kdcore.losses.schedule import Progress, TimeSchedule


def _span_fraction(progress: Progress, epochs: int | None) -> float:
    """Share of the run (or of its first ``epochs`` epochs) done, in [0, 1]."""
    span = (epochs or progress.epochs) * progress.steps_per_epoch
    return min(progress.step / max(span, 1), 1.0)


class Cosine(TimeSchedule):
    """``cosine``: from ``start`` to ``end`` along a half cosine over the run
    (or its first ``epochs`` epochs), step by step; ``end`` afterwards:
    ``end + (start - end) * (1 + cos(pi * f)) / 2`` with ``f`` the fraction done."""

    def __init__(self, start: float = 0.0, end: float = 1.0, epochs: int | None = None):
        self.start = params.number("start", start)
        self.end = params.number("end", end)
        self.epochs = params.positive_int("epochs", epochs, optional=True)

    def __call__(self, progress: Progress) -> float:
        f = _span_fraction(progress, self.epochs)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * f))


class Step(TimeSchedule):
    """``step``: ``start`` until the first milestone, then equal steps that
    reach ``end`` after the last one: with ``k`` the number of milestones
    ``m`` with ``epoch > m``, ``start + (end - start) * k / len(milestones)``.
    One milestone is a plain switch between two values."""

    def __init__(self, start: float = 1.0, end: float = 0.0, milestones: Sequence[int] = (1,)):
        self.start = params.number("start", start)
        self.end = params.number("end", end)
        if isinstance(milestones, (str, bytes)) or not milestones \
                or not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in milestones) \
                or list(milestones) != sorted(set(milestones)):
            raise ConfigError(f"milestones: must be a non-empty increasing list of positive epochs, "
                              f"got {milestones!r}")
        self.milestones = tuple(milestones)

    def __call__(self, progress: Progress) -> float:
        k = sum(progress.epoch > m for m in self.milestones)
        return self.start + (self.end - self.start) * k / len(self.milestones)


class Switch(TimeSchedule):
    """``switch``: ``before`` through epoch ``epoch``, ``after`` from epoch
    ``epoch + 1``. TAND's vision recipe (50 epochs of KD, then TAND) is
    ``{name="switch", epoch=50, before=1, after=0}`` on the KD term and
    ``{name="switch", epoch=50, before=0, after=1}`` on the TAND term."""

    #: parameters for kdcore.testing's checks (epoch has no default)
    testing_params = {"epoch": 2}

    def __init__(self, epoch: int, before: float = 1.0, after: float = 0.0):
        self.epoch = params.positive_int("epoch", epoch)
        self.before = params.number("before", before)
        self.after = params.number("after", after)

    def __call__(self, progress: Progress) -> float:
        return self.before if progress.epoch <= self.epoch else self.after


class DistillDecay(TimeSchedule):
    """``distill_decay``: the distillation-decay baseline of
    cross-batch weighting paper sec. 3.3, one schedule per term, chosen by ``role``.

    With ``f`` the fraction of the run done (step by step), ``m = midpoint``,
    ``a0 = start`` (the initial KL weight, 0.9) and ``s = min(f / m, 1)``:

    * ``role="kd"`` (the KL term):   ``a0 * (1 - s)``: 0.9 -> 0 by the midpoint, 0 after;
    * ``role="ce"`` (the CE term):   ``1 - a0 * (1 - s)``: 0.1 -> 1 by the midpoint, 1 after;
    * ``role="reg"`` (the KD regulariser): 0 before the midpoint, ``beta`` from it on.

    ``beta`` belongs to role ``"reg"`` only (default 1: put the paper's beta
    here or in the term's ``weight``).
    """

    ROLES = ("kd", "ce", "reg")
    #: parameters for kdcore.testing's checks (role has no default)
    testing_params = {"role": "kd"}

    def __init__(self, role: str, start: float = 0.9, midpoint: float = 0.5, beta: float | None = None):
        self.role = params.one_of("role", role, self.ROLES)
        self.start = params.in_range("start", start, 0.0, 1.0, closed_high=True)
        self.midpoint = params.in_range("midpoint", midpoint, 0.0, 1.0, closed_high=True)
        if self.midpoint == 0.0:
            raise ConfigError("midpoint: must be > 0, got 0")
        if beta is not None and self.role != "reg":
            raise ConfigError(f"beta: only used with role 'reg', not {self.role!r}")
        self.beta = params.number("beta", 1.0 if beta is None else beta) if self.role == "reg" else None

    def __call__(self, progress: Progress) -> float:
        f = progress.fraction
        if self.role == "reg":
            return self.beta if f >= self.midpoint else 0.0
        kl = self.start * (1.0 - min(f / self.midpoint, 1.0))
        return kl if self.role == "kd" else 1.0 - kl
