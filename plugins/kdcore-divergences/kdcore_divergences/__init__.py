"""kdcore-divergences: divergences for token-level distillation (docs/methods/divergences.md).

Registers the divergences ``jsd`` (generalised Jensen-Shannon, GKD),
``skew_kl`` / ``skew_rkl`` (DistiLLM), ``tvd`` (total variation) and ``akl``
(adaptive KL, Wu et al. 2024). Each is ``div(teacher_logp, student_logp)`` and
returns one value per row, so every divergence-pluggable loss takes them, e.g.
``kdcore.create("loss", "kd", divergence={"name": "jsd", "beta": 0.3})``.
"""

from kdcore_divergences.divergences import (AdaptiveKL, GeneralizedJSD, SkewKL, SkewReverseKL,
                                            TotalVariation, akl_rows, akl_weights)

__all__ = ["AdaptiveKL", "GeneralizedJSD", "SkewKL", "SkewReverseKL", "TotalVariation", "akl_rows",
           "akl_weights"]
