"""Data: the dataset contract and dataset fingerprints.

- :mod:`~kdcore.data.splits`: :class:`DataSplits` (train, val and test splits and what they hold) and
  :class:`TensorSplit`;
- :mod:`~kdcore.data.fingerprint`: a digest of a split's samples, which teacher caches and stores are
  checked against.

Layer 2: imports :mod:`kdcore.common` only.
"""

from kdcore.data.splits import DataSplits, Inputs, TensorSplit, index_inputs

__all__ = ["DataSplits", "TensorSplit", "Inputs", "index_inputs"]
