"""kdcore-tand: Target-Aware Normalized Distillation (TAND paper eq. 9).

Registers the loss ``tand`` = NKD (eq. 7, from kdcore-nkd) + TAD (eq. 8, DKD's
decoupled form, from kdcore-dkd).
"""

from kdcore_tand.loss import TAND

__all__ = ["TAND"]
