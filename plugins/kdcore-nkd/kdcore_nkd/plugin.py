"""kdcore hook implementations of the ``nkd`` plugin."""

from kdcore import hookimpl

from kdcore_nkd.loss import NKD


@hookimpl
def register_losses(register):
    register("nkd", NKD)
