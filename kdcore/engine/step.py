"""The pieces of one optimizer step: forward passes with taps, micro-batch
weights, gradient synchronisation of the loss terms' parameters, clipping, and
the finiteness guard.

:meth:`kdcore.engine.trainer.Trainer.train_step` composes them; each is a
plain function or a small class so that it can be read and tested alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from kdcore.engine.batches import Batch
from kdcore.engine.distributed import Dist
from kdcore.engine.taps import Tapping
from kdcore.errors import NonFiniteLoss
from kdcore.outputs import Outputs


def forward(model: nn.Module, inputs, tapped: nn.Module, taps: Sequence[str], index: Tensor) -> Outputs:
    """``model(inputs)`` (keyword arguments for a mapping) as :class:`Outputs`, with the
    outputs of the ``taps`` modules of ``tapped`` (the unwrapped model) in ``features``."""
    if taps:
        with Tapping(tapped, taps) as features:
            raw = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    else:
        features = None
        raw = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    out = Outputs.of(raw)
    if features:
        out.features.update(features)
    if out.index is None:
        out.index = index
    return out


def micro_weights(micros: Sequence[Batch], dist: Dist) -> list[Tensor] | None:
    """The factor of each micro-batch's loss so that the step's loss is the mean
    over the kept positions of the whole step on every rank.

    A loss is the mean over its micro-batch's kept positions (targets not
    -100); micro-batch ``m`` of a rank gets ``kept_m * world / kept_total``
    (DDP averages the ranks' gradients, hence ``world``), so accumulation and
    sharding change nothing but memory. None where no weighting is needed
    (one micro-batch in one process).
    """
    if len(micros) == 1 and not dist.enabled:
        return None
    kept = torch.stack([m.kept() for m in micros])
    total = dist.sum_(kept.sum()).clamp(min=1.0)
    return list((kept * dist.world / total).unbind())


def local_shares(micros: Sequence[Batch]) -> list[float] | None:
    """Each micro-batch's share of this rank's kept positions (for logging the step's values)."""
    if len(micros) == 1:
        return None
    kept = [float(m.kept()) for m in micros]
    total = max(sum(kept), 1.0)
    return [k / total for k in kept]


def trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def average_gradients(params: Sequence[nn.Parameter], dist: Dist) -> None:
    """Average the gradients of parameters that DDP/FSDP do not manage (the loss
    terms' connectors) over the ranks, in one all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not dist.enabled or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = dist.mean(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class BufferSync:
    """Keeps the loss terms' floating-point buffers (memory banks, running
    statistics) identical on every rank after each step.

    A loss module's ``buffer_sync`` attribute says how: ``"sum_updates"``
    (default: every rank's change is added, exact for updates at disjoint
    indices such as a memory bank keyed by sample index), ``"mean"`` (the
    ranks' values are averaged) or ``"none"`` (the loss keeps them in step
    itself).
    """

    def __init__(self, modules: nn.ModuleDict, dist: Dist):
        self.dist = dist
        self.groups: dict[str, list[Tensor]] = {"sum_updates": [], "mean": []}
        if not dist.enabled:
            return
        for module in modules.values():
            mode = getattr(module, "buffer_sync", "sum_updates")
            if mode not in ("sum_updates", "mean", "none"):
                raise ValueError(f"{type(module).__name__}.buffer_sync: {mode!r} is not "
                                 "'sum_updates', 'mean' or 'none'")
            if mode != "none":
                self.groups[mode] += [b for b in module.buffers() if b.is_floating_point()]
        self._before: list[Tensor] = []

    def __bool__(self) -> bool:
        return any(self.groups.values())

    def snapshot(self) -> None:
        self._before = [b.detach().clone() for b in self.groups["sum_updates"]]

    def sync(self) -> None:
        for b, old in zip(self.groups["sum_updates"], self._before):
            delta = self.dist.sum_(b.detach() - old)
            b.copy_(old + delta)
        for b in self.groups["mean"]:
            b.copy_(self.dist.mean(b.detach()))


def _local_norm(grads: list[Tensor]) -> Tensor:
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor


def clip_gradients(groups: Sequence[Sequence[nn.Parameter]], max_norm: float) -> Tensor:
    """Clip the global gradient norm over every group (student and loss terms,
    sharded or not) to ``max_norm``; returns the norm before clipping."""
    grads = [[p.grad for p in ps if p.grad is not None] for ps in groups]
    norms = [_local_norm(g) for g in grads if g]
    if not norms:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    for ps in groups:
        with_grad = [p for p in ps if p.grad is not None]
        if with_grad:
            torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total)
    return total


class FiniteGuard:
    """Stops a run at the first non-finite loss.

    On the CPU each step is checked as it ends (no cost: there is no device to
    wait for), naming the term. On an accelerator the steps never wait for the
    host: the first bad step is recorded on the device and :meth:`check`
    (called at logging points and epoch ends) raises for it.
    """

    def __init__(self, device: torch.device):
        self.eager = device.type == "cpu"
        self.bad_step: Tensor | None = None  # -1 while every step was finite

    def observe(self, step: int, losses: Mapping[str, Tensor], total: Tensor) -> None:
        """Record step ``step`` (its term losses and their weighted ``total``)."""
        if self.eager:
            if math.isfinite(float(total.detach())):
                return  # one read per step; the terms are looked at only when the total is bad
            for name, value in {**losses, "total": total}.items():
                v = float(value.detach())
                if not math.isfinite(v):
                    raise NonFiniteLoss(step, name, v)
            return
        bad = ~torch.isfinite(total.detach().float())
        if self.bad_step is None:
            self.bad_step = torch.full((), -1, dtype=torch.long, device=bad.device)
        first = bad & (self.bad_step < 0)
        self.bad_step = torch.where(first, torch.full_like(self.bad_step, step), self.bad_step)

    def check(self) -> None:
        if self.bad_step is not None and int(self.bad_step) >= 0:
            raise NonFiniteLoss(int(self.bad_step), "total", float("nan"))
