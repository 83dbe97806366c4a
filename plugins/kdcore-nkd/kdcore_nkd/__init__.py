"""kdcore-nkd: Normalized Knowledge Distillation (Yang et al. 2023; TAND paper eq. 7).

Registers the loss ``nkd``. Its terms are public functions so that other
losses (TAND, eq. 9) reuse them: :func:`target_term` (``-p_t log q_t``),
:func:`normalized_nontarget_term` (``CE(rho^t, rho^s)`` or a divergence) and
:func:`nkd_rows` (the whole per-row loss from ``split_target`` pieces) and
:func:`split_nkd_rows` (the same from a fused ``kdcore.losses.functional.target_split_terms``).
"""

from kdcore_nkd.loss import NKD
from kdcore_nkd.terms import nkd_rows, normalized_nontarget_term, split_nkd_rows, target_log_prob, target_term

__all__ = ["NKD", "nkd_rows", "normalized_nontarget_term", "split_nkd_rows", "target_log_prob", "target_term"]
