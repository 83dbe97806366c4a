"""Time-based loss-weight schedules: ``w_i(t) = weight_i * schedule_i(progress)``.

A schedule is any callable ``schedule(progress) -> float`` (a multiplier of the
term's ``weight``); :class:`TimeSchedule` is a convenient base.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Progress:
    """Where training stands when a step's weights are computed."""

    epoch: int            #: current epoch, counted from 1
    step: int             #: optimizer steps taken before this one in the whole run
    epochs: int           #: total epochs of the run
    steps_per_epoch: int  #: optimizer steps in one epoch
    total_steps: int = 0  #: the run's optimizer steps when it is bounded by ``run.max_steps`` (0: epochs)

    @property
    def step_in_epoch(self) -> int:
        return self.step - (self.epoch - 1) * self.steps_per_epoch

    @property
    def fraction(self) -> float:
        """Share of the run done at this step, in [0, 1)."""
        total = max(self.total_steps or self.epochs * self.steps_per_epoch, 1)
        return min(self.step / total, 1.0)


class TimeSchedule:
    """Base of time-based schedules; subclasses implement :meth:`__call__`."""

    def __call__(self, progress: Progress) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
