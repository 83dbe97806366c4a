"""kdcore-dkd: Decoupled Knowledge Distillation (Zhao et al. 2022; TAND paper eq. 3-5).

Registers the loss ``dkd`` (its warm-up is the core's ``warmup`` schedule). The pieces
that other plugins reuse (TAND's target-aware part, eq. 8) are
:func:`part_divergences` and :func:`decoupled_rows`.
"""

from kdcore_dkd.decoupled import decoupled_rows, part_divergences
from kdcore_dkd.loss import DKD

__all__ = ["DKD", "decoupled_rows", "part_divergences"]
