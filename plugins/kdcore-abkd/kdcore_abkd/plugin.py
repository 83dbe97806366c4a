"""kdcore hook implementations of the ``abkd`` plugin."""

from kdcore import hookimpl

from kdcore_abkd.divergence import AlphaBetaDivergence
from kdcore_abkd.losses import ABDKD, ABKD


@hookimpl
def register_losses(register):
    register("abkd", ABKD)
    register("abdkd", ABDKD)


@hookimpl
def register_divergences(register):
    register("ab", AlphaBetaDivergence)
