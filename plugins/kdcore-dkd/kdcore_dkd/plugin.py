"""kdcore hook implementations of the ``dkd`` plugin."""

from kdcore import hookimpl

from kdcore_dkd.loss import DKD
from kdcore_dkd.warmup import DKDWarmup


@hookimpl
def register_losses(register):
    register("dkd", DKD)


@hookimpl
def register_schedulers(register):
    # "warmup" (the general linear warm-up) belongs to kdcore-schedulers; the
    # DKD paper's epoch-wise warm-up is registered under its own name.
    register("dkd_warmup", DKDWarmup)
