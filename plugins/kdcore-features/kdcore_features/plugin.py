"""kdcore hook implementations of the ``features`` plugin."""

from kdcore import hookimpl

from kdcore_features.losses import AT, CRD, PKT, SP, USKD, VID, FitNet, Relational, ReviewKD


@hookimpl
def register_losses(register):
    register("fitnet", FitNet)
    register("at", AT)
    register("sp", SP)
    register("pkt", PKT)
    # Relational KD (Park et al. 2019, "rkd" in methods.md) is registered as "relational":
    # the core already registers "rkd" (reverse KL), and a second registration is an error.
    register("relational", Relational)
    register("vid", VID)
    register("crd", CRD)
    register("reviewkd", ReviewKD)
    register("uskd", USKD)
