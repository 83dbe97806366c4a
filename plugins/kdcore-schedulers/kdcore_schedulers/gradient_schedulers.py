"""Gradient-aware schedulers ``[weighting]``: ``crossbatch``, ``mgda``, ``pcgrad``.

They receive a :class:`kdcore.losses.weighting.GradientContext` whose losses are
already time-weighted, take flat gradients with ``ctx.grad`` (averaged over
ranks under DDP, so every rank solves for the same weights) and return an
:class:`kdcore.losses.weighting.Update`. Terms outside the groups a scheduler
weighs are added to the update with coefficient 1. A term missing from
``ctx.losses`` (its time weight is 0 on this step) has a zero gradient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from kdcore.common import params
from kdcore.common.errors import ConfigError
from kdcore.losses.schedule import Progress
from kdcore.losses.weighting import GradientContext, GradientWeighting, Update
from kdcore_schedulers.crossbatch import MODES, crossbatch_update
from kdcore_schedulers.multitask import mgda_weight, pcgrad_coefficients, pcgrad_orders
from kdcore_schedulers.vecmath import gram_matrix


def _names(name: str, value: Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{name}: must be a list of loss-term names, got {value!r}")
    return tuple(value)


def _zeros(ctx: GradientContext) -> Tensor:
    p = ctx.params
    return torch.zeros(sum(x.numel() for x in p), dtype=p[0].dtype, device=p[0].device)


def _grad_of(ctx: GradientContext, losses: Mapping[str, Tensor], names: Sequence[str],
             retain_graph: bool = True) -> Tensor:
    """Flat gradient of the sum of the named losses present (zeros if none)."""
    present = [losses[n] for n in names if n in losses]
    if not present:
        return _zeros(ctx)
    return ctx.grad(sum(present[1:], present[0]), retain_graph=retain_graph)


def _group_grads(ctx: GradientContext, groups: Sequence[Sequence[str]]) -> list[Tensor]:
    """Gradients of each group's summed losses on the batch; the last backward
    frees the batch's graph (nothing else runs through it on this step)."""
    last = len(groups) - 1
    return [_grad_of(ctx, ctx.losses, names, retain_graph=i < last) for i, names in enumerate(groups)]


def _per_term(ctx: GradientContext, coef: Mapping[str, float]) -> dict[str, float]:
    """``coef/<term>``: each present term's multiplier in the update (1 outside the groups)."""
    return {f"coef/{n}": float(coef.get(n, 1.0)) for n in ctx.losses}


class _TwoGroups:
    """The CE / KD split of the terms: explicit names, or by role."""

    def __init__(self, ce_terms: Sequence[str] | None, kd_terms: Sequence[str] | None):
        self.ce_terms = _names("ce_terms", ce_terms)
        self.kd_terms = _names("kd_terms", kd_terms)
        both = set(self.ce_terms or ()) & set(self.kd_terms or ())
        if both:
            raise ConfigError(f"kd_terms: {sorted(both)} also listed in ce_terms")

    def split(self, ctx: GradientContext) -> tuple[list[str], list[str], list[str]]:
        """(CE names, KD names, other names present in ``ctx.losses``)."""
        explicit = set(self.ce_terms or ()) | set(self.kd_terms or ())
        ce = list(self.ce_terms) if self.ce_terms is not None else \
            [n for n, r in ctx.roles.items() if r == "ce" and n not in explicit]
        kd = list(self.kd_terms) if self.kd_terms is not None else \
            [n for n, r in ctx.roles.items() if r == "kd" and n not in explicit]
        grouped = set(ce) | set(kd)
        return ce, kd, [n for n in ctx.losses if n not in grouped]


class CrossBatch(GradientWeighting):
    """``crossbatch``: cross-batch gradient-consistency weighting
    (cross-batch weighting paper sec. 2, eqs. 4-11; see
    :func:`kdcore_schedulers.crossbatch_update`).

    ``g_ce`` / ``g_kd`` are the gradients of the summed CE / KD terms on the
    batch, ``G`` that of the CE terms on the auxiliary batch. ``c`` is the
    paper's alpha (eq. 10); ``mode`` is ``"paper"`` or ``"align"``. The weights
    are recomputed every ``every`` steps; in between, the cached coefficients
    ``1/2 + lam w_ce`` (CE terms) and ``1/2 + lam w_kd`` (KD terms) reproduce
    eq. 11 with one combined backward.
    """

    needs_aux_batch = True

    def __init__(self, c: float = 0.5, mode: str = "paper", every: int = 1,
                 ce_terms: Sequence[str] | None = None, kd_terms: Sequence[str] | None = None):
        self.c = params.non_negative("c", c)
        self.mode = params.one_of("mode", mode, MODES)
        self.every = params.positive_int("every", every)
        self.groups = _TwoGroups(ce_terms, kd_terms)
        self._coef: dict[str, float] | None = None

    def wants_gradients(self, progress: Progress) -> bool:
        return self._coef is None or progress.step % self.every == 0

    def combine(self, ctx: GradientContext) -> Update:
        if ctx.aux_losses is None:
            raise RuntimeError("crossbatch needs the auxiliary batch (ctx.aux_losses) from the engine")
        ce, kd, other = self.groups.split(ctx)
        g_ce, g_kd, *g_other = _group_grads(ctx, [ce, kd] + ([other] if other else []))
        g_ref = _grad_of(ctx, ctx.aux_losses(ce), ce, retain_graph=False)
        g, info = crossbatch_update(g_ce, g_kd, g_ref, c=self.c, mode=self.mode)
        if g_other:
            g.add_(g_other[0])
        self._coef = {**{n: info["coef_ce"] for n in ce}, **{n: info["coef_kd"] for n in kd}}
        return Update(grad=g, info={**info, **_per_term(ctx, self._coef)})

    def coefficients(self) -> Mapping[str, float]:
        if self._coef is None:
            raise RuntimeError("crossbatch: no weights computed yet")
        return dict(self._coef)

    def state_dict(self) -> dict[str, Any]:
        return {"coefficients": None if self._coef is None else dict(self._coef)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        coef = state.get("coefficients")
        self._coef = None if coef is None else {str(k): float(v) for k, v in coef.items()}


class MGDA(GradientWeighting):
    """``mgda``: the two-task min-norm combination of the CE and KD gradients
    (Sener & Koltun 2018, alg. 1; Desideri 2012), ``g = gamma g_ce + (1 - gamma) g_kd``,
    weights summing to 1 (a baseline of cross-batch weighting paper sec. 3.3)."""

    def __init__(self, ce_terms: Sequence[str] | None = None, kd_terms: Sequence[str] | None = None):
        self.groups = _TwoGroups(ce_terms, kd_terms)

    def combine(self, ctx: GradientContext) -> Update:
        ce, kd, other = self.groups.split(ctx)
        g_ce, g_kd, *g_other = _group_grads(ctx, [ce, kd] + ([other] if other else []))
        (k11, k12), (_, k22) = gram_matrix([g_ce, g_kd])
        gamma = mgda_weight(k11, k12, k22)
        g = torch.add(g_ce * gamma, g_kd, alpha=1.0 - gamma)
        if g_other:
            g.add_(g_other[0])
        n_ce, n_kd = math.sqrt(k11), math.sqrt(k22)
        norm = math.sqrt(max(gamma * gamma * k11 + 2 * gamma * (1 - gamma) * k12 + (1 - gamma) ** 2 * k22, 0.0))
        info = {"w_ce": gamma, "w_kd": 1.0 - gamma, "norm_ce": n_ce, "norm_kd": n_kd,
                "cos_ce_kd": k12 / (n_ce * n_kd) if n_ce > 0 and n_kd > 0 else 0.0, "norm_min": norm}
        coef = {**{n: gamma for n in ce}, **{n: 1.0 - gamma for n in kd}}
        return Update(grad=g, info={**info, **_per_term(ctx, coef)})


class PCGrad(GradientWeighting):
    """``pcgrad``: projecting conflicting gradients (Yu et al. 2020, alg. 1)
    over the loss terms listed in ``terms`` (default: every term present),
    two or more. ``seed=None`` projects in a fixed order (the listed order);
    an integer shuffles each task's order with a generator seeded from
    ``(seed, step)``, the same on every rank and after a resume."""

    def __init__(self, terms: Sequence[str] | None = None, seed: int | None = None):
        self.terms = _names("terms", terms)
        if self.terms is not None and (len(set(self.terms)) != len(self.terms) or len(self.terms) < 2):
            raise ConfigError(f"terms: must name two or more distinct terms, got {list(self.terms)}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"seed: must be an integer or omitted, got {seed!r}")
        self.seed = seed

    def combine(self, ctx: GradientContext) -> Update:
        tasks = list(self.terms) if self.terms is not None else list(ctx.losses)
        if not tasks:
            raise RuntimeError("pcgrad: no loss terms to combine")
        other = [n for n in ctx.losses if n not in tasks]
        grads = _group_grads(ctx, [[n] for n in tasks] + ([other] if other else []))
        g_other = grads[len(tasks):]
        grads = grads[:len(tasks)]
        gram = gram_matrix(grads)
        coef, conflicts = pcgrad_coefficients(gram, pcgrad_orders(len(tasks), self.seed, ctx.progress.step))
        g = grads[0] * coef[0]
        for c, gk in zip(coef[1:], grads[1:]):
            g.add_(gk, alpha=c)
        if g_other:
            g.add_(g_other[0])
        norms = [math.sqrt(gram[i][i]) for i in range(len(tasks))]
        info: dict[str, float] = {"conflicts": float(conflicts), **_per_term(ctx, dict(zip(tasks, coef)))}
        for i, n in enumerate(tasks):
            info[f"norm/{n}"] = norms[i]
            for j in range(i + 1, len(tasks)):
                den = norms[i] * norms[j]
                info[f"cos/{n}/{tasks[j]}"] = gram[i][j] / den if den > 0 else 0.0
        return Update(grad=g, info=info)
