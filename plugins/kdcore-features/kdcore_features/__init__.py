"""kdcore-features: feature-based distillation and USKD self-distillation.

Registers the losses ``fitnet``, ``at``, ``sp``, ``pkt``, ``relational`` (Relational
KD, "rkd" in the papers; renamed because the core's ``rkd`` is reverse KL), ``vid``,
``crd``, ``reviewkd`` and ``uskd``. Every loss is an ``nn.Module`` with
``uses_outputs = True``, called ``loss(student_outputs, teacher_outputs, target)``
with :class:`kdcore.Outputs`; see docs/methods/features.md.
"""

from kdcore_features.base import FeatureLoss
from kdcore_features.losses import AT, CRD, PKT, SP, USKD, VID, FitNet, Relational, ReviewKD
from kdcore_features.taps import Taps, default_taps

__all__ = ["AT", "CRD", "PKT", "SP", "USKD", "VID", "FeatureLoss", "FitNet", "Relational", "ReviewKD",
           "Taps", "default_taps"]
