"""Gradients outside a plain ``backward()``: the loss terms' own parameters and
buffers across ranks, per-group norms and checks, clipping, and the guard that
stops a run at its first non-finite loss or gradient.

Each piece is a plain function or a small class, read and tested alone;
:mod:`kdcore.engine.step` composes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from kdcore.common.errors import NonFiniteGradient, NonFiniteLoss
from kdcore.engine.distributed import Dist


def trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def average_gradients(params: Sequence[nn.Parameter], mean: Callable[[Tensor], Tensor] | None) -> None:
    """Average the gradients of parameters that DDP/FSDP do not manage (the loss
    terms' connectors and trainable transforms) over the processes, in one
    collective, ``mean`` (a tensor's mean over the processes; None: one process).

    Every process takes part with the same tensor whatever its gradients: a
    gradient a process does not have (its loss did not reach the parameter: a
    term whose rows there were all ignored) counts as zero, and a parameter no
    process has a gradient for keeps none (the optimizer skips it, as in one
    process)."""
    if mean is None or not params:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=params[0].dtype, device=params[0].device)
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    flat = mean(torch.cat([*parts, present]))
    anywhere = None if bool(present.all()) else (flat[-len(params):] > 0).tolist()  # read only where needed
    offset = 0
    for i, p in enumerate(params):
        value = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is not None:
            p.grad.copy_(value)
        elif anywhere[i]:
            p.grad = value.clone()


def own_gradients(terms, weighted: Mapping[str, Tensor]) -> list[tuple[str, list[nn.Parameter], tuple]]:
    """Each active term's gradient to its own parameters (a connector), the
    batch's graph kept: taken before a gradient-aware scheduler, whose update
    covers the student's parameters only, frees it."""
    out = []
    for term in terms:
        value = weighted.get(term.id)
        if value is None or not value.requires_grad or not isinstance(term.loss, nn.Module):
            continue
        ps = trainable(term.loss.parameters())
        if ps:
            out.append((term.id, ps, torch.autograd.grad(value, ps, retain_graph=True, allow_unused=True)))
    return out


def set_own_gradients(own: Sequence[tuple[str, list[nn.Parameter], tuple]], coefficients: Mapping[str, float]) -> None:
    """Write :func:`own_gradients` into ``.grad``, each term's scaled by its coefficient in the
    scheduler's update (1 where the scheduler gives none), as the student's share of that term is."""
    for name, ps, grads in own:
        c = float(coefficients.get(name, 1.0))
        for p, g in zip(ps, grads):
            if g is not None:
                g = g * c
                p.grad = g if p.grad is None else p.grad + g


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


def _per_group(groups: Sequence[Sequence[nn.Parameter]], value) -> Tensor:
    """``value(grads)`` of each group's gradients ``[len(groups)]``, 0 for a group
    without gradients, on the gradients' device."""
    values = [value(g) if g else None for g in ([p.grad for p in ps if p.grad is not None] for ps in groups)]
    found = [v for v in values if v is not None]
    if not found:
        return torch.zeros(len(groups))
    zero = torch.zeros((), device=found[0].device, dtype=found[0].dtype)
    return torch.stack([zero if v is None else v.to(zero) for v in values])


def gradient_norms(groups: Sequence[Sequence[nn.Parameter]]) -> Tensor:
    """The gradient norm of each group of parameters ``[len(groups)]`` (sharded
    gradients reduced over the ranks), 0 for a group without gradients: one
    fused norm per group, on the gradients' device."""
    return _per_group(groups, _local_norm)


#: a group of at most this many gradients is checked by one sum per tensor, a
#: larger one (or a sharded one) by its fused norm, which takes fewer operations
SUMMED_MAX_TENSORS = 16


def _finite_check(grads: list[Tensor]) -> Tensor:
    if len(grads) > SUMMED_MAX_TENSORS or any(hasattr(g, "full_tensor") for g in grads):
        return _local_norm(grads)
    low = (torch.float16, torch.bfloat16)
    return torch.stack([g.sum(dtype=torch.float32) if g.dtype in low else g.sum() for g in grads]).sum()


def gradient_checks(groups: Sequence[Sequence[nn.Parameter]]) -> Tensor:
    """A value per group of parameters ``[len(groups)]`` that is non-finite where
    the group's gradient has a non-finite element (or is so large that it
    overflows), 0 for a group without gradients: the sum of every element for a
    few plain tensors (half the time of the norm on the CPU, docs/benchmarks.md),
    else the group's norm. For the finiteness guard where nothing clips."""
    return _per_group(groups, _finite_check)


def clip_gradients(groups: Sequence[Sequence[nn.Parameter]], max_norm: float,
                   norms: Tensor | None = None) -> Tensor:
    """Clip the global gradient norm over every group (student and loss terms,
    sharded or not) to ``max_norm``; returns the norm before clipping.
    ``norms``: the groups' :func:`gradient_norms`, where already computed."""
    norms = gradient_norms(groups) if norms is None else norms
    total = torch.linalg.vector_norm(norms)
    for ps in groups:
        with_grad = [p for p in ps if p.grad is not None]
        if with_grad:
            torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total)
    return total


class FiniteGuard:
    """Stops a run at the first step with a non-finite loss, or with a
    non-finite gradient while its losses were finite.

    ``terms`` are the objective's term ids and ``groups`` the names of the
    parameter groups whose gradient norms (or :func:`gradient_checks`)
    :meth:`observe_gradients` receives
    (the student, each loss term with parameters). On the CPU each step is
    checked as it ends (no cost: there is no device to wait for), naming the
    term or the group. On an accelerator the steps never wait for the host:
    the first bad step, what it was (loss or gradient), the term or group and
    its value are recorded on the device, and :meth:`check` (called at logging
    points and epoch ends) raises for it.
    """

    def __init__(self, device: torch.device, terms: Sequence[str] = (), groups: Sequence[str] = ()):
        self.eager = device.type == "cpu"
        self.terms, self.groups = list(terms), list(groups)
        self._bad_gradient: tuple[int, str, float] | None = None  # CPU: until the step's losses are read
        #: accelerators: ``[step, kind (0 loss, 1 gradient), index]`` of the first bad step (-1: none) and its value
        self._first: Tensor | None = None
        self._value: Tensor | None = None
        self._term_index: dict[tuple[str, ...], Tensor] = {}

    def observe_gradients(self, step: int, norms: Tensor) -> None:
        """Record the gradient norms (or checks) ``[len(groups)]`` of step ``step`` (before its losses)."""
        if self.eager:
            if not math.isfinite(float(norms.sum())):
                i = int((~torch.isfinite(norms)).nonzero()[0])
                self._bad_gradient = (step, self.groups[i], float(norms[i]))
            return
        self._record(step, 1, norms.detach().float(), None)

    def observe(self, step: int, losses: Mapping[str, Tensor], total: Tensor) -> None:
        """Record step ``step`` (its term losses and their weighted ``total``)."""
        if self.eager:
            bad_gradient, self._bad_gradient = self._bad_gradient, None
            if math.isfinite(float(total.detach())):
                if bad_gradient is not None:
                    raise NonFiniteGradient(*bad_gradient)
                return  # one read per step; the terms are looked at only when the total is bad
            for name, value in {**losses, "total": total}.items():
                v = float(value.detach())
                if not math.isfinite(v):
                    raise NonFiniteLoss(step, name, v)
            return
        values = torch.stack([v.detach().float().reshape(()) for v in (*losses.values(), total)])
        self._record(step, 0, values, tuple(losses))

    def _record(self, step: int, kind: int, values: Tensor, names: tuple[str, ...] | None) -> None:
        """Keep ``(step, kind, index of the first non-finite value)`` and that value on the
        device where nothing was kept yet; a step's losses take precedence over its gradients."""
        device = values.device
        if self._first is None:
            self._first = torch.full((3,), -1, dtype=torch.long, device=device)
            self._value = torch.zeros((), device=device)
        bad = ~torch.isfinite(values)
        pos = bad.int().argmax()
        index = pos if names is None else self._indices(names, device)[pos]
        free = (self._first[0] < 0) | ((self._first[0] == step) & (self._first[1] == 1) & (kind == 0))
        take = bad.any() & free
        new = torch.stack([torch.full_like(index, step), torch.full_like(index, kind), index])
        self._first = torch.where(take, new, self._first)
        self._value = torch.where(take, values[pos], self._value)

    def _indices(self, names: tuple[str, ...], device: torch.device) -> Tensor:
        """The positions in ``terms`` of ``names``, then -1 for the total (cached per tuple)."""
        if names not in self._term_index:
            self.terms += [n for n in names if n not in self.terms]
            self._term_index[names] = torch.tensor([*(self.terms.index(n) for n in names), -1], device=device)
        return self._term_index[names]

    def check(self) -> None:
        if self._first is None:
            return
        step, kind, index = (int(x) for x in self._first.tolist())
        if step < 0:
            return
        value = float(self._value)
        if kind == 1:
            raise NonFiniteGradient(step, self.groups[index], value)
        raise NonFiniteLoss(step, "total" if index < 0 else self.terms[index], value)
