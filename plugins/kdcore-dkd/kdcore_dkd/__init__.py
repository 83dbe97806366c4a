"""kdcore-dkd: Decoupled Knowledge Distillation (Zhao et al. 2022; tand.txt eq. 3-5).

Registers the loss ``dkd`` and the time schedule ``dkd_warmup``. The pieces
that other plugins reuse (TAND's target-aware part, eq. 8) are
:func:`part_divergences` and :func:`decoupled_rows`.
"""

from kdcore_dkd.decoupled import decoupled_rows, part_divergences
from kdcore_dkd.loss import DKD
from kdcore_dkd.warmup import DKDWarmup

__all__ = ["DKD", "DKDWarmup", "decoupled_rows", "part_divergences"]
