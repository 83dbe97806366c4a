"""kdcore-schedulers: loss-weight schedulers for kdcore.

Time schedules (multipliers of a term's weight): ``cosine``, ``step``,
``switch``, ``distill_decay`` (the core has ``fixed``, ``linear``, ``warmup``). Gradient-aware schedulers
(``[weighting]``): ``crossbatch`` (cross-batch weighting paper sec. 2), ``mgda``,
``pcgrad``. :func:`crossbatch_update` is the cross-batch update on flat
gradient vectors.
"""

__version__ = "0.1.0"

from kdcore_schedulers.crossbatch import align_weights, crossbatch_update, simplex_weights
from kdcore_schedulers.gradient_schedulers import MGDA, PCGrad, CrossBatch
from kdcore_schedulers.multitask import mgda_weight, pcgrad_coefficients
from kdcore_schedulers.time_schedules import Cosine, DistillDecay, Step, Switch

__all__ = ["__version__", "crossbatch_update", "simplex_weights", "align_weights", "mgda_weight",
           "pcgrad_coefficients", "CrossBatch", "MGDA", "PCGrad", "Cosine", "Step", "Switch",
           "DistillDecay"]
