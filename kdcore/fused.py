"""The fused vocabulary projection: a logit loss from hidden states and heads, chunk by chunk.

For language models the logits ``[N, V]`` of both models dominate memory.
:func:`fused_kept_sum` takes, for each model, either logits or ``(hidden,
head)`` and evaluates ``kept_sum`` (a logit loss's sum over rows) over chunks
of ``chunk_size`` rows: each chunk's logits are computed from ``head(hidden)``,
its value and its gradients (to the hidden states, to the logits given as
such, and to the heads' parameters) are taken at once, and the chunk's
intermediates are freed before the next, so neither model's full logits ever
exist. Ignored positions are dropped before anything is projected.

The heads' parameters are found as ``head.parameters()`` when the head is an
``nn.Module`` or has a ``parameters()`` method (a bound method of a module
has neither: pass the module); a plain function has none. Only parameters
that require gradients get them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def head_parameters(head: Any) -> list[nn.Parameter]:
    """The trainable parameters of a head (see the module docstring)."""
    params = getattr(head, "parameters", None)
    if not callable(params):
        return []
    return [p for p in params() if p.requires_grad]


class _Side:
    """One model's input to the fused sum: logits rows, or hidden rows and a head."""

    def __init__(self, rows: Tensor | None, head: Callable[[Tensor], Tensor] | None):
        self.rows, self.head = rows, head

    def chunk(self, sl: slice, need: bool) -> tuple[Tensor | None, Tensor | None]:
        """``(leaf, logits)`` of rows ``sl``: the leaf takes the gradient."""
        if self.rows is None:
            return None, None
        leaf = self.rows[sl].detach().requires_grad_(need)
        return leaf, leaf if self.head is None else self.head(leaf)


class _FusedSum(torch.autograd.Function):
    """Sum of ``kept_sum`` over row chunks, gradients taken chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, kept_sum, chunk_size, s_head, t_head, s_rows, t_rows, target, *params):
        s, t = _Side(s_rows, s_head), _Side(t_rows, t_head)
        need_s = s_rows.requires_grad
        need_t = t_rows is not None and t_rows.requires_grad
        grad_s = torch.zeros_like(s_rows) if need_s else None
        grad_t = torch.zeros_like(t_rows) if need_t else None
        grad_p = [torch.zeros_like(p) for p in params]
        total = None
        n = s_rows.shape[0]
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            with torch.enable_grad():
                s_leaf, s_logits = s.chunk(sl, need_s)
                t_leaf, t_logits = t.chunk(sl, need_t)
                value = kept_sum(s_logits, t_logits, None if target is None else target[sl])
                inputs = [x for x, need in ((s_leaf, need_s), (t_leaf, need_t)) if need] + list(params)
                grads = torch.autograd.grad(value, inputs, allow_unused=True) if inputs else ()
            it = iter(grads)
            for buf, need in ((grad_s, need_s), (grad_t, need_t)):
                if need:
                    g = next(it)
                    if g is not None:
                        buf[sl] = g
            for acc in grad_p:
                g = next(it)
                if g is not None:
                    acc += g
            total = value.detach() if total is None else total + value.detach()
        ctx.save_for_backward(*(x if x is not None else torch.empty(0) for x in (grad_s, grad_t)), *grad_p)
        ctx.has = (grad_s is not None, grad_t is not None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        grad_s, grad_t, grad_p = saved[0], saved[1], saved[2:]
        scale = grad_out
        gs = grad_s * scale.to(grad_s.dtype) if ctx.has[0] else None
        gt = grad_t * scale.to(grad_t.dtype) if ctx.has[1] else None
        return (None, None, None, None, gs, gt, None, *(g * scale.to(g.dtype) for g in grad_p))


def _flat_rows(x: Tensor, keep: Tensor | None) -> Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if keep is None else rows[keep]


def fused_kept_sum(kept_sum: Callable[[Tensor, Tensor | None, Tensor | None], Tensor], chunk_size: int,
                   student: tuple[Tensor, Any], teacher: tuple[Tensor, Any] | None,
                   target: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(sum of kept_sum over the kept rows, number of kept rows)``.

    ``student`` and ``teacher`` are ``(hidden, head)`` pairs, or ``(logits, None)``
    for a model given as logits; ``hidden`` / ``logits`` are ``[..., H]`` /
    ``[..., V]`` with the leading dims of ``target``. Rows whose target is -100
    are dropped before projecting; the target passed to ``kept_sum`` has none."""
    keep = None if target is None else (target.reshape(-1) != -100)
    s_rows = _flat_rows(student[0], keep)
    t_rows = None if teacher is None else _flat_rows(teacher[0], keep)
    y = None if target is None else target.reshape(-1)[keep]
    s_params = head_parameters(student[1])
    t_params = [p for p in head_parameters(teacher[1]) if all(p is not q for q in s_params)] \
        if teacher is not None else []
    count = torch.tensor(float(s_rows.shape[0]), device=s_rows.device)
    if s_rows.shape[0] == 0:
        zero = (s_rows.sum() * 0.0).float()
        for p in s_params + t_params:
            zero = zero + (p.sum() * 0.0).float()
        return zero, count
    total = _FusedSum.apply(kept_sum, chunk_size, student[1], None if teacher is None else teacher[1],
                            s_rows, t_rows, y, *s_params, *t_params)
    return total, count
