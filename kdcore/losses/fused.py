"""The fused vocabulary projection: a logit loss from hidden states and heads, chunk by chunk.

For language models the logits ``[N, V]`` of both models dominate memory.
:func:`fused_kept_sum` takes, for each model, either logits or ``(hidden,
head)`` and evaluates ``kept_sum`` (a logit loss's sum over rows) over chunks
of ``chunk_size`` rows: each chunk's logits are computed from ``head(hidden)``,
its value and its gradients (to the hidden states, to the logits given as
such, to the heads' parameters and to the loss's own) are taken at once, and the chunk's
logits and intermediates are freed before the next, so neither model's full
logits ever exist. Ignored positions (target -100) are dropped before
anything is projected. The backward pass only scales the stored gradients by
the upstream gradient.

The head rule (:func:`head_parameters`), which decides the parameters that
get gradients through the fused path (docs/fused.md):

- an ``nn.Module`` head: its ``parameters()``;
- any other callable with a callable ``parameters`` attribute: what it returns
  (the way to name the parameters of a head explicitly);
- a bound method of an ``nn.Module`` (``model.project``): that module's
  ``parameters()``;
- a ``functools.partial``: the rule applied to its function, plus its
  arguments that are modules (their parameters) or tensors that require grad;
- anything else (a plain function or lambda): no parameters, so whatever it
  closes over gets no gradient.

Only parameters that require gradients are considered; one the head does not
use gets no gradient (``.grad`` stays None), as in the dense path.

The lean kd chunk (:func:`kd_chunk`): where the loss is Hinton KD with the KL
divergence on untransformed logits (it says so through
``LogitLoss.lean_kd_temperature``) and the teacher takes no gradient, a chunk
is evaluated without autograd on the loss: its value and its gradient with
respect to the student's chunk logits, ``T (q - p)``, are computed in place
in three chunk-sized buffers, then that gradient is sent back through the
student's head alone. Any other loss, or a teacher that takes a gradient,
goes through the general chunk (autograd on ``kept_sum``).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from kdcore.losses.functional import IGNORE_INDEX, exp

KeptSum = Callable[[Tensor, Tensor | None, Tensor | None], Tensor]


def _rule_tensors(head: Any) -> Iterable[Tensor]:
    if isinstance(head, nn.Module):
        return head.parameters()
    explicit = getattr(head, "parameters", None)
    if callable(explicit):
        return explicit()
    if inspect.ismethod(head) and isinstance(head.__self__, nn.Module):
        return head.__self__.parameters()
    if isinstance(head, functools.partial):
        found = list(_rule_tensors(head.func))
        for arg in (*head.args, *head.keywords.values()):
            if isinstance(arg, nn.Module):
                found.extend(arg.parameters())
            elif isinstance(arg, Tensor):
                found.append(arg)
        return found
    return ()


def head_parameters(*heads: Any) -> list[Tensor]:
    """The tensors that require grad of ``heads`` by the head rule (module
    docstring), each once even where heads share them (tied weights)."""
    found: dict[int, Tensor] = {}
    for head in heads:
        if head is not None:
            for p in _rule_tensors(head):
                if p.requires_grad:
                    found.setdefault(id(p), p)
    return list(found.values())


class _Side:
    """One model's rows (logits, or hidden states with a head) and whether they take a gradient."""

    def __init__(self, rows: Tensor | None, head: Callable[[Tensor], Tensor] | None):
        self.rows, self.head = rows, head
        self.needs_grad = rows is not None and rows.requires_grad
        self.grad = torch.zeros_like(rows) if self.needs_grad else None

    def leaf(self, sl: slice) -> Tensor | None:
        """Rows ``sl`` as a fresh leaf (requiring grad where the rows do)."""
        return None if self.rows is None else self.rows[sl].detach().requires_grad_(self.needs_grad)

    def logits(self, leaf: Tensor | None) -> Tensor | None:
        return leaf if self.head is None or leaf is None else self.head(leaf)


def _chunk(kept_sum: KeptSum, s: _Side, t: _Side, target: Tensor | None, sl: slice,
           params: tuple[Tensor, ...]) -> tuple[Tensor, list[Tensor | None]]:
    """The chunk's value and its gradients ``[student rows, teacher rows, *params]``
    (None where not needed or unused); the chunk's logits die with this frame,
    before its backward pass runs."""
    with torch.enable_grad():
        s_leaf, t_leaf = s.leaf(sl), t.leaf(sl)
        value = kept_sum(s.logits(s_leaf), t.logits(t_leaf), None if target is None else target[sl])
    wanted = [(leaf, side.needs_grad) for leaf, side in ((s_leaf, s), (t_leaf, t))]
    inputs = [leaf for leaf, need in wanted if need] + list(params)
    grads = iter(torch.autograd.grad(value, inputs, allow_unused=True) if inputs and value.requires_grad
                 else [None] * len(inputs))
    rows = [next(grads) if need else None for _, need in wanted]
    return value.detach(), rows + list(grads)


def _storages(tensors: Iterable[Tensor]) -> set[int]:
    return {x.untyped_storage().data_ptr() for x in tensors}


def _scratch(z: Tensor, kept: set[int]) -> Tensor:
    """``z`` (detached, upcast to float32 at least) as a buffer that may be
    overwritten: ``z``'s own memory unless something in ``kept`` (the inputs,
    tensors the head's backward needs) shares it, else a copy."""
    if z.dtype in (torch.float16, torch.bfloat16):
        return z.float()
    z = z.detach()
    return z.clone() if z.untyped_storage().data_ptr() in kept else z


def _dot_where_positive(p: Tensor, x: Tensor) -> Tensor:
    """``sum p * x`` over every element, a term being 0 where ``p = 0`` (where
    ``x`` may be ``-inf``); ``x`` may be overwritten. On the CPU the mask is
    applied only when the plain sum comes out NaN (docs/conventions.md)."""
    p, x = p.reshape(-1), x.reshape(-1)
    if p.device.type == "cpu":
        out = torch.dot(p, x)
        if not math.isnan(out):
            return out
    x.masked_fill_(p == 0, 0.0)
    return torch.dot(p, x)


def kd_chunk(student: Tensor, teacher: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``(sum over rows of T^2 KL(p || q), T (q - p))`` for chunk logits ``[c, V]``,
    ``p = softmax(teacher / T)``, ``q = softmax(student / T)`` (Hinton et al.
    2015; the gradient of the sum with respect to ``student``). Both inputs are
    overwritten (float32 or float64 buffers the caller owns); no autograd, and
    no chunk-sized memory beyond the two inputs and one buffer ``p``.

    ``KL`` is summed as ``sum p log p - sum p log q`` (a term 0 where ``p = 0``),
    the same value as :func:`kdcore.losses.functional.kd_rows` summed over the rows."""
    b, a = teacher, student
    if temperature != 1.0:
        b.div_(temperature)
        a.div_(temperature)
    b.sub_(b.amax(-1, keepdim=True))
    p = exp(b)
    mass = p.sum(-1, keepdim=True)
    p.div_(mass)
    b.sub_(mass.log_())                       # b = log p
    value = _dot_where_positive(p, b)         # sum p log p; b is free from here on
    a.sub_(a.amax(-1, keepdim=True))
    q = exp(a, out=b)
    mass = q.sum(-1, keepdim=True)
    q.div_(mass)
    a.sub_(mass.log_())                       # a = log q
    value = (value - _dot_where_positive(p, a)) * (temperature * temperature)
    return value, q.sub_(p).mul_(temperature)


def _lean_kd_chunk(temperature: float, s: _Side, t: _Side, sl: slice,
                   params: tuple[Tensor, ...]) -> tuple[Tensor, list[Tensor | None]]:
    """:func:`_chunk` for the lean kd path (module docstring): the teacher's
    chunk logits under no_grad, the loss and its logits gradient by
    :func:`kd_chunk`, then one backward pass through the student's head."""
    inputs = _storages(x for x in (s.rows, t.rows) if x is not None)
    with torch.no_grad():
        t_rows = t.rows[sl]
        teacher = _scratch(t.logits(t_rows), inputs)
    saved: list[Tensor] = []

    def pack(x: Tensor) -> Tensor:
        saved.append(x)
        return x

    s_leaf = s.leaf(sl)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        logits = s.logits(s_leaf)
    student = _scratch(logits, inputs | _storages(saved))
    del saved
    value, grad = kd_chunk(student, teacher, temperature)
    del student, teacher
    wanted = ([s_leaf] if s.needs_grad else []) + list(params)
    if not wanted or not logits.requires_grad:
        return value, [None, None] + [None] * len(params)
    grads = iter(torch.autograd.grad(logits, wanted, grad.to(logits.dtype), allow_unused=True))
    return value, [next(grads) if s.needs_grad else None, None, *grads]


class _FusedSum(torch.autograd.Function):
    """Sum of ``kept_sum`` over row chunks, gradients taken chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, kept_sum, lean_temperature, chunk_size, s_head, t_head, s_rows, t_rows, target, *params):
        s, t = _Side(s_rows, s_head), _Side(t_rows, t_head)
        param_grads: list[Tensor | None] = [None] * len(params)
        total = None
        for start in range(0, s_rows.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            if lean_temperature is None:
                value, (g_s, g_t, *g_params) = _chunk(kept_sum, s, t, target, sl, params)
            else:
                value, (g_s, g_t, *g_params) = _lean_kd_chunk(lean_temperature, s, t, sl, params)
            for side, g in ((s, g_s), (t, g_t)):
                if g is not None:
                    side.grad[sl] = g
            for i, g in enumerate(g_params):
                if g is not None:
                    param_grads[i] = g if param_grads[i] is None else param_grads[i].add_(g)
            total = value if total is None else total + value
        ctx.grads = (s.grad, t.grad, *param_grads)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        scaled = [None if g is None else g * grad_out.to(g.dtype) for g in ctx.grads]
        return (None, None, None, None, None, *scaled[:2], None, *scaled[2:])


def kept_rows(x: Tensor, keep: Tensor | None) -> Tensor:
    """``x`` flattened to rows ``[n, last]``, only the kept ones where ``keep`` is given."""
    rows = x.reshape(-1, x.shape[-1])
    if keep is None:
        return rows
    if rows.shape[0] != keep.shape[0]:
        raise ValueError(f"target shape does not match the leading dims of a {tuple(x.shape)} input")
    return rows[keep]


def fused_kept_sum(kept_sum: KeptSum, chunk_size: int, student: tuple[Tensor, Any],
                   teacher: tuple[Tensor, Any] | None, target: Tensor | None,
                   kd_temperature: float | None = None, params: Iterable[Tensor] = ()) -> tuple[Tensor, Tensor]:
    """``(sum of kept_sum over the kept rows, number of kept rows)``.

    ``student`` and ``teacher`` are ``(hidden, head)`` pairs, or ``(logits, None)``
    for a model given as logits; ``hidden`` / ``logits`` are ``[..., H]`` /
    ``[..., V]`` with the leading dims of ``target``. Rows whose target is -100
    are dropped before projecting; the target passed to ``kept_sum`` has none.
    With no kept row the sum is 0, with zero gradients. ``kd_temperature``: T
    where ``kept_sum`` is the sum of ``T^2 KL(p^T || q^T)`` over rows, which
    lets a teacher that takes no gradient go through the lean kd chunk
    (module docstring). ``params``: tensors ``kept_sum`` itself uses that take
    gradients too (the loss's own parameters, e.g. a learnable temperature),
    beside the heads' parameters."""
    keep = None if target is None else (target.reshape(-1) != IGNORE_INDEX)
    s_rows = kept_rows(student[0], keep)
    t_rows = None if teacher is None else kept_rows(teacher[0], keep)
    y = None if target is None else target.reshape(-1)[keep]
    t_head = None if teacher is None else teacher[1]
    params = list({id(p): p for p in (*head_parameters(student[1], t_head), *params)}.values())
    count = torch.tensor(float(s_rows.shape[0]), device=s_rows.device)
    if s_rows.shape[0] == 0:
        zero = sum((x.sum() * 0.0 for x in (s_rows, *params)), torch.zeros((), device=s_rows.device))
        return zero, count
    lean = (kd_temperature is not None and t_rows is not None and not t_rows.requires_grad
            and not head_parameters(t_head))
    total = _FusedSum.apply(kept_sum, kd_temperature if lean else None, chunk_size, student[1], t_head,
                            s_rows, t_rows, y, *params)
    return total, count
