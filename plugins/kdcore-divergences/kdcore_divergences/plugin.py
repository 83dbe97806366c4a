"""kdcore hook implementations of the ``divergences`` plugin."""

from kdcore import hookimpl

from kdcore_divergences.divergences import AdaptiveKL, GeneralizedJSD, SkewKL, SkewReverseKL, TotalVariation


@hookimpl
def register_divergences(register):
    register("jsd", GeneralizedJSD)
    register("skew_kl", SkewKL)
    register("skew_rkl", SkewReverseKL)
    register("tvd", TotalVariation)
    register("akl", AdaptiveKL)
