"""Hook implementations of the ``schedulers`` plugin."""

from __future__ import annotations

from kdcore import hookimpl
from kdcore_schedulers import gradient_schedulers, time_schedules


@hookimpl
def register_schedulers(register):
    register("cosine", time_schedules.Cosine)
    register("step", time_schedules.Step)
    register("switch", time_schedules.Switch)
    register("distill_decay", time_schedules.DistillDecay)
    register("crossbatch", gradient_schedulers.CrossBatch)
    register("mgda", gradient_schedulers.MGDA)
    register("pcgrad", gradient_schedulers.PCGrad)
