"""Hook implementations of kdcore-dist (entry point ``dist``)."""

from __future__ import annotations

import kdcore
from kdcore_dist.correlation import PearsonDistance
from kdcore_dist.loss import DIST


@kdcore.hookimpl
def register_losses(register):
    register("dist", DIST)


@kdcore.hookimpl
def register_divergences(register):
    register("pearson", PearsonDistance)
