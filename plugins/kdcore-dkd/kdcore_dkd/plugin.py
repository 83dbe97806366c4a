"""kdcore hook implementations of the ``dkd`` plugin."""

from kdcore import hookimpl

from kdcore_dkd.loss import DKD


@hookimpl
def register_losses(register):
    register("dkd", DKD)

