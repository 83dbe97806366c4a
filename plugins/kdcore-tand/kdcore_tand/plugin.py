"""kdcore hook implementations of the ``tand`` plugin."""

from kdcore import hookimpl

from kdcore_tand.loss import TAND


@hookimpl
def register_losses(register):
    register("tand", TAND)
