"""What a dataset factory returns: train/val/test splits and their metadata.

In-memory datasets return :class:`TensorSplit` splits, which the engine
batches by indexing (fast, no per-sample Python); any other
``torch.utils.data.Dataset`` is loaded with a DataLoader. A sample is
``(input, target)``, or a mapping holding ``"target"`` and the model's
inputs by name (``input_ids``, ``attention_mask``, ...: a structured batch,
passed to the model as keyword arguments).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import Tensor

Inputs = Tensor | Mapping[str, Tensor]


def index_inputs(inputs: Inputs, idx: Any) -> Inputs:
    """``inputs[idx]`` for a tensor or for every tensor of a mapping."""
    if isinstance(inputs, Mapping):
        return {k: v[idx] for k, v in inputs.items()}
    return inputs[idx]


@attrs.frozen
class TensorSplit(torch.utils.data.Dataset):
    """A split held in memory: inputs ``[n, ...]`` (a tensor, or a mapping of
    named tensors for structured batches), targets ``[n]`` or ``[n, T]``.

    ``posterior`` is the exact Bayes posterior ``p*(y|x)`` ``[n, C]`` where the
    data are synthetic and it is known.
    """

    inputs: Inputs
    targets: Tensor
    posterior: Tensor | None = None

    def __len__(self) -> int:
        return self.targets.shape[0]

    def __getitem__(self, i: int) -> tuple[Inputs, Tensor]:
        return index_inputs(self.inputs, i), self.targets[i]


@attrs.frozen
class DataSplits:
    """A dataset's splits. ``val`` / ``test`` may be None."""

    train: Any
    val: Any
    test: Any
    num_classes: int
    input_shape: tuple[int, ...]
    meta: dict[str, Any] = attrs.field(factory=dict)
