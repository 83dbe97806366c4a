"""Stopping a diverging run: non-finite losses and gradient norms.

:func:`check_finite` checks one step at once (one device sync).
:class:`FiniteGuard` records steps on the device without a sync and raises at
:meth:`FiniteGuard.check`, which the loop calls before it writes a checkpoint,
so ``last.pt`` and ``best.pt`` only ever hold finite states. Under AMP fp16 pass
only the losses: the GradScaler skips steps with non-finite gradients itself,
and those are not failures.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from kdcore.errors import NonFiniteLoss


def _label(name: str) -> str:
    return "the gradient norm" if name == "grad_norm" else f"loss term {name!r}"


def check_finite(values: Mapping[str, Tensor], step: int) -> None:
    """Raise :class:`NonFiniteLoss` naming ``step`` and the first non-finite value.

    ``values`` maps term ids (and optionally ``"grad_norm"``) to 0-dim tensors.
    """
    if not values:
        return
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    finite = torch.isfinite(stacked)
    if bool(finite.all()):
        return
    index = int((~finite).int().argmax())
    raise NonFiniteLoss(step, _label(list(values)[index]), float(stacked[index]))


class FiniteGuard:
    """Watches every step's values on the device; :meth:`check` raises for the first bad one."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._first: Tensor | None = None  # [step, name index, value] of the first bad step; step -1: none

    def observe(self, values: Mapping[str, Tensor], step: int) -> None:
        """Record ``values`` (term id -> 0-dim tensor) of optimizer step ``step`` (no device sync)."""
        if not values:
            return
        for name in values:
            if name not in self.names:
                self.names.append(name)
        stacked = torch.stack([v.detach().double().reshape(()) for v in values.values()])  # exact steps
        index = torch.tensor([self.names.index(n) for n in values], device=stacked.device, dtype=torch.float64)
        bad = ~torch.isfinite(stacked)
        at = bad.int().argmax()
        record = torch.stack([torch.full_like(stacked[0], float(step)), index[at], stacked[at]])
        if self._first is None:
            self._first = torch.full_like(record, -1.0)
        hit = bad.any() & (self._first[0] < 0)
        self._first = torch.where(hit, record, self._first)

    def check(self) -> None:
        """Raise :class:`NonFiniteLoss` if any observed step had a non-finite value (one sync)."""
        if self._first is None:
            return
        step, index, value = self._first.tolist()
        if step >= 0:
            raise NonFiniteLoss(int(step), _label(self.names[int(index)]), value)
