"""kdcore-abkd: ABKD, distillation with the alpha-beta divergence (ABKD paper).

Registers the divergence ``ab`` and the losses ``abkd`` (eq. 7) and ``abdkd``
(DKD with the alpha-beta divergence on the non-target part).
"""

from kdcore_abkd.divergence import AlphaBetaDivergence
from kdcore_abkd.losses import ABDKD, ABKD

__all__ = ["ABDKD", "ABKD", "AlphaBetaDivergence"]
