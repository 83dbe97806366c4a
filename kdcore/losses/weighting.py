"""The seam for gradient-aware loss weighting (``[weighting]`` in a config).

A gradient-aware scheduler (e.g. cross-batch / CAGrad-style weighting, MGDA,
PCGrad) subclasses :class:`GradientWeighting`. On a step where
:meth:`GradientWeighting.wants_gradients` is true, the engine builds a
:class:`GradientContext` holding every term's loss on the batch (graphs
alive) and hands it to :meth:`GradientWeighting.combine`, which returns an
:class:`Update`: either a flat gradient for the student's parameters, or a
coefficient per term (the engine then runs one backward of
``sum_i c_i L_i``). On other steps the engine uses
:meth:`GradientWeighting.coefficients` (cheap reuse of earlier weights).

Under DDP, :meth:`GradientContext.grad` returns gradients already averaged
over ranks, so every rank solves for the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

from kdcore.losses.schedule import Progress


@attrs.frozen
class Update:
    """What a gradient-aware scheduler returns for one step."""

    grad: Tensor | None = None                   #: flat update over ``ctx.params``
    coefficients: Mapping[str, float] | None = None  #: or one coefficient per term (missing: 1)
    info: Mapping[str, float] = attrs.field(factory=dict)  #: scalars to log (weights, lambda, cosines)

    def __attrs_post_init__(self) -> None:
        if (self.grad is None) == (self.coefficients is None):
            raise ValueError("an Update has either grad or coefficients")


@attrs.define
class GradientContext:
    """Everything a gradient-aware scheduler may use on one step."""

    losses: dict[str, Tensor]            #: term name -> time-weighted loss on the batch (weight != 0 now)
    roles: dict[str, str]                #: every term's name -> "ce" (label term) or "kd" (uses the teacher)
    params: list[torch.nn.Parameter]     #: the student's trainable parameters
    progress: Progress
    #: ``aux_losses(names=None)``: time-weighted losses of the named terms (default: all
    #: active ones) on an auxiliary batch; the teacher runs only if a named term needs it
    aux_losses: Callable[..., dict[str, Tensor]] | None = None
    reduce: Callable[[Tensor], Tensor] = lambda t: t  #: mean over ranks (identity without DDP)

    def grad(self, loss: Tensor, *, retain_graph: bool = True) -> Tensor:
        """Flat gradient of ``loss`` over :attr:`params`, averaged over ranks."""
        grads = torch.autograd.grad(loss, self.params, retain_graph=retain_graph, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                          for g, p in zip(grads, self.params)])
        return self.reduce(flat)

    def terms(self, role: str, names: Sequence[str] | None = None) -> list[str]:
        """Names of the terms of a role, or the given names (checked)."""
        if names is not None:
            unknown = [n for n in names if n not in self.roles]
            if unknown:
                raise KeyError(f"unknown loss term(s) {unknown}; terms are {list(self.roles)}")
            return list(names)
        return [n for n, r in self.roles.items() if r == role]


class GradientWeighting:
    """Base class of gradient-aware schedulers (see the module docstring)."""

    #: whether :attr:`GradientContext.aux_losses` must be provided
    needs_aux_batch: bool = False

    def wants_gradients(self, progress: Progress) -> bool:
        """Whether this step needs per-term gradients (default: every step)."""
        return True

    def combine(self, ctx: GradientContext) -> Update:
        raise NotImplementedError

    def coefficients(self) -> Mapping[str, float]:
        """Per-term coefficients for steps where :meth:`wants_gradients` is false."""
        raise NotImplementedError(f"{type(self).__name__} must recompute every step")

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (tensors, numbers, strings, lists, dicts only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def unflatten_into(flat: Tensor, params: Sequence[torch.nn.Parameter]) -> None:
    """Write a flat gradient vector into the parameters' ``.grad``."""
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset:offset + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += n
