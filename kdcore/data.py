"""What a dataset factory returns: train/val/test splits and their metadata.

In-memory datasets return :class:`TensorSplit` splits, which the engine
batches by indexing (fast, no per-sample Python); any other
``torch.utils.data.Dataset`` yielding ``(input, target)`` is loaded with a
DataLoader.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor


@attrs.frozen
class TensorSplit(torch.utils.data.Dataset):
    """A split held in memory: inputs ``[n, ...]``, targets ``[n]``.

    ``posterior`` is the exact Bayes posterior ``p*(y|x)`` ``[n, C]`` where the
    data are synthetic and it is known.
    """

    inputs: Tensor
    targets: Tensor
    posterior: Tensor | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.inputs[i], self.targets[i]


@attrs.frozen
class DataSplits:
    """A dataset's splits. ``val`` / ``test`` may be None."""

    train: Any
    val: Any
    test: Any
    num_classes: int
    input_shape: tuple[int, ...]
    meta: dict[str, Any] = attrs.field(factory=dict)
