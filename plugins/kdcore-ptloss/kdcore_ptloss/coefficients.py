"""PTLoss perturbation coefficients ``eps`` (PTLoss paper eq. 7).

``eps`` is either a list of ``M`` numbers shared by every class (``eps_m``)
or a ``C x M`` table (``eps_{c,m}``, one row per class). Either way it is
held as a float64 tensor of shape ``[M]`` or ``[C, M]``; :func:`per_class`
broadcasts it to ``[C, M]`` once the number of classes is known.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kdcore.common.errors import ConfigError


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_eps(eps: Any, name: str = "eps") -> Tensor:
    """Validate ``eps`` and return it as a float64 ``[M]`` or ``[C, M]`` tensor.

    Accepts a number (``M = 1``), a list of numbers, a list of equal-length
    lists (one per class) or a tensor of one of those shapes.
    """
    if isinstance(eps, Tensor):
        table = eps.detach().to("cpu", torch.float64)
        if table.dim() not in (0, 1, 2) or not torch.isfinite(table).all():
            raise ConfigError(f"{name}: must be a finite list of M numbers or a C x M table, "
                              f"got a tensor of shape {tuple(eps.shape)}")
        return table.reshape(1) if table.dim() == 0 else table.clone()
    if _is_number(eps):
        return torch.tensor([float(eps)], dtype=torch.float64)
    if isinstance(eps, (str, bytes)) or not isinstance(eps, Sequence):
        raise ConfigError(f"{name}: must be a list of M numbers or a C x M table, got {eps!r}")
    if all(_is_number(e) for e in eps):
        return torch.tensor([float(e) for e in eps], dtype=torch.float64)
    rows = list(eps)
    ok = rows and all(isinstance(r, Sequence) and not isinstance(r, (str, bytes))
                      and all(_is_number(e) for e in r) for r in rows)
    if not ok or len({len(r) for r in rows}) != 1 or len(rows[0]) == 0:
        raise ConfigError(f"{name}: must be a list of M finite numbers or a C x M table of "
                          f"finite numbers with rows of equal length, got {eps!r}")
    return torch.tensor([[float(e) for e in r] for r in rows], dtype=torch.float64)


def per_class(eps: Tensor, num_classes: int) -> Tensor:
    """``eps`` as a ``[C, M]`` table for ``num_classes`` classes."""
    if eps.dim() == 1:
        return eps.unsqueeze(0).expand(num_classes, -1)
    if eps.shape[0] != num_classes:
        raise ValueError(f"eps is a table for {eps.shape[0]} classes but the inputs have "
                         f"{num_classes} classes")
    return eps


def as_list(eps: Tensor) -> list:
    """Plain Python numbers (a list of M floats or a C x M nested list)."""
    return eps.tolist()
