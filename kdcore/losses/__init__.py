"""Losses: the contract every loss term meets, and the maths losses share.

- :mod:`~kdcore.losses.base`: :class:`LogitLoss` (flattening, ``-100`` masking, transforms, chunking) and
  :func:`build` / :func:`resolve_divergence`, which build the components a loss names;
- :mod:`~kdcore.losses.outputs`: :class:`Outputs`, what a model's forward returns (logits, features,
  ``hidden`` and ``head``);
- :mod:`~kdcore.losses.functional`: per-row KL, cross-entropy and the target / non-target split;
- :mod:`~kdcore.losses.fused`: losses from ``head(hidden)`` chunk by chunk, never the full logits;
- :mod:`~kdcore.losses.divergences`: ``kl`` and ``rkl``;
- the contracts around a term in training: :mod:`~kdcore.losses.schedule` (a weight over time),
  :mod:`~kdcore.losses.weighting` (weights from the terms' gradients), :mod:`~kdcore.losses.policy`
  (which batch a step trains on).

Layer 2: imports :mod:`kdcore.common` and :mod:`kdcore.plugins` (the registry) only.
"""

from kdcore.losses.base import LogitLoss, Spec, build, resolve_divergence, resolve_transforms
from kdcore.losses.functional import IGNORE_INDEX
from kdcore.losses.outputs import Outputs

__all__ = ["LogitLoss", "Spec", "build", "resolve_divergence", "resolve_transforms", "Outputs", "IGNORE_INDEX"]
