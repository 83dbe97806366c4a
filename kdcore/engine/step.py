"""One optimizer step: :class:`Step`, over ``run.accumulate`` micro-batches or
through a gradient-aware ``[weighting]``.

A step (1) lets the ``[batch_policy]`` replace the batch, (2) sets the learning
rate, (3) runs forward and backward per micro-batch, each loss weighted so that
the step's loss is the mean over the kept positions of the whole step on every
rank (:func:`micro_weights`), or hands the terms' losses to the weighting,
(4) synchronises what DDP/FSDP do not (the loss terms' parameters and
buffers), checks the gradients and clips them, (5) takes the optimizer step,
and (6) gives the step's losses to the finiteness guard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from kdcore.engine import gradients
from kdcore.engine.batches import Batch
from kdcore.engine.distributed import Dist
from kdcore.engine.forward import Forward
from kdcore.engine.meter import Meter
from kdcore.engine.objective import Objective
from kdcore.engine.runtime import Runtime
from kdcore.losses.policy import StepContext
from kdcore.losses.schedule import Progress
from kdcore.losses.weighting import GradientContext, GradientWeighting, unflatten_into


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




class Step:
    """One optimizer step of a run: ``step(batch, progress, lr, index, meter, aux)``
    returns the unweighted term losses (the step's means over its kept positions).

    ``index`` is the step's number from 1 (what the guard reports); ``meter``
    collects the step's values for logging; ``aux`` yields the batches a
    gradient-aware weighting asks for beside the step's own (cross-batch).
    """

    def __init__(self, runtime: Runtime, forward: Forward, objective: Objective, student: nn.Module,
                 model: nn.Module, teacher: nn.Module | None, optimizer: torch.optim.Optimizer,
                 params: list[nn.Parameter], term_params: list[nn.Parameter], *,
                 accumulate: int, clip_grad_norm: float, seed: int, sharded: bool,
                 weighting: GradientWeighting | None, batch_policy):
        self.runtime, self.forward, self.objective = runtime, forward, objective
        self.student, self.model, self.teacher, self.optimizer = student, model, teacher, optimizer
        self.accumulate, self.clip, self.seed, self.sharded = accumulate, clip_grad_norm, seed, sharded
        self.weighting, self.batch_policy = weighting, batch_policy
        self.params, self.term_params = params, term_params  # the student's and the loss terms'
        self.scaler = torch.amp.GradScaler("cuda") if runtime.amp == "fp16" else None
        self.buffer_sync = gradients.BufferSync(objective.modules, runtime.dist)
        #: the parameter groups whose gradient norms the guard reads: the student, each term with parameters
        self.grad_groups = {"the student's parameters": self.params, **{
            f"loss term {t.id!r}'s parameters": ps for t in objective.terms
            if isinstance(t.loss, nn.Module) and (ps := gradients.trainable(t.loss.parameters()))}}
        self.guard = gradients.FiniteGuard(runtime.device, [t.id for t in objective.terms], list(self.grad_groups))
        self.batch: Batch | None = None  # the last step's batch, after the batch policy
        self.rank_weight: Tensor | None = None  # see _accumulated_step and _rank_part

    @property
    def dist(self) -> Dist:
        return self.runtime.dist

    def __call__(self, batch: Batch, progress: Progress, lr: float, index: int, meter: Meter | None = None,
                 aux=None) -> dict[str, Tensor]:
        if self.batch_policy is not None:  # the step's batch, before any forward pass
            batch = self.batch_policy(batch, StepContext(
                self.student, self.teacher, progress, self.seed, self.runtime.device, self.dist.rank,
                self.dist.world, self.runtime.autocast))
        if lr != self.optimizer.param_groups[0]["lr"]:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        weights = self.objective.weights(progress)
        if self.weighting is not None and self.weighting.wants_gradients(progress):
            losses, total = self._gradient_step(batch, weights, progress, aux, meter, index)
        else:
            coefs = weights
            if self.weighting is not None:
                c = self.weighting.coefficients()
                coefs = {k: w * float(c.get(k, 1.0)) for k, w in weights.items()}
            losses, total = self._accumulated_step(batch, coefs, index)
            if meter is not None:
                meter.add(self._rank_part({**{f"loss/{k}": v for k, v in losses.items()}, "loss/total": total}))
        self.guard.observe(index, losses, total)
        self.batch = batch  # what the losses average over (the loop weighs ranks by its kept positions)
        return losses

    def _rank_part(self, values: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """This rank's step values weighted by its share of the step's kept positions (times
        the world size), so that the mean over ranks the epoch's record takes is the step's
        value on the whole batch, as one process computes it (no synchronisation here)."""
        if not self.dist.enabled or self.rank_weight is None:
            return values
        return {k: v * self.rank_weight for k, v in values.items()}

    def _no_sync(self, last: bool):
        """Skip the gradient all-reduce on all micro-batches but the last."""
        if last or not self.dist.enabled:
            return contextlib.nullcontext()
        if self.sharded:
            self.student.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _accumulated_step(self, batch: Batch, coefs: Mapping[str, float],
                          index: int) -> tuple[dict[str, Tensor], Tensor]:
        """Forward and backward over ``run.accumulate`` micro-batches, then one update."""
        active = self.objective.active(coefs)
        micros = batch.split(self.accumulate)
        factors = micro_weights(micros, self.dist)
        #: this rank's kept positions * world / the step's on all ranks (None: one micro-batch, one process)
        self.rank_weight = None if factors is None else torch.stack(factors).sum()
        shares = local_shares(micros)
        self.optimizer.zero_grad(set_to_none=True)
        if self.buffer_sync:
            self.buffer_sync.snapshot()
        logged: dict[str, Tensor] = {}
        stepped = False
        for i, mb in enumerate(micros):
            with self._no_sync(last=i == len(micros) - 1), self.runtime.autocast():
                s, t = self.forward(mb, active, self.model)
                losses = self.objective.losses(s, t, mb.target, coefs, step=index)
                total = self.objective.total(losses, coefs)
            if self.sharded:
                self.student.set_requires_gradient_sync(True)
            if total is None:  # every weight is 0 at this step: nothing to learn from
                continue
            if shares is None:  # one micro-batch: the step's values are its values
                logged, step_total = losses, total.detach()
            else:
                for k, v in losses.items():
                    logged[k] = v.detach() * shares[i] + logged.get(k, 0.0)
            if factors is not None:
                total = total * factors[i]
            (total if self.scaler is None else self.scaler.scale(total)).backward()
            stepped = True
        if not stepped:
            return {}, torch.zeros((), device=self.runtime.device)
        self._update(index)
        if shares is not None:
            step_total = self.objective.total(logged, coefs)
        return logged, step_total

    def _update(self, index: int) -> None:
        """Synchronise what DDP/FSDP do not, clip, and take the optimizer step."""
        gradients.average_gradients(self.term_params, self.dist.mean if self.dist.enabled else None)
        clip = self.clip
        if clip and self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if clip or self.scaler is None:  # fp16's scaler skips steps with non-finite gradients itself
            groups = list(self.grad_groups.values())
            norms = gradients.gradient_norms(groups) if clip else gradients.gradient_checks(groups)
            if self.scaler is None:
                self.guard.observe_gradients(index, norms)
            if clip:
                gradients.clip_gradients(groups, clip, norms)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.buffer_sync:
            self.buffer_sync.sync()

    def _gradient_step(self, batch: Batch, weights, progress, aux, meter,
                       index: int) -> tuple[dict[str, Tensor], Tensor]:
        """A step through the gradient-aware seam (per-term gradients, reduced over ranks)."""
        module = self.student  # not the DDP wrapper: gradients are reduced explicitly

        def term_losses(b: Batch, names=None):
            terms = self.objective.active(weights, names)
            with self.runtime.autocast():
                s, t = self.forward(b, terms, module)
                raw = self.objective.losses(s, t, b.target, weights, names, step=index)
            return raw, {k: weights[k] * v for k, v in raw.items()}

        raw, weighted = term_losses(batch)

        def aux_losses(names=None):
            return term_losses(next(aux), names)[1]

        ctx = GradientContext(weighted, self.objective.roles(), self.params, progress,
                              aux_losses if self.weighting.needs_aux_batch else None, self.dist.mean)
        own = gradients.own_gradients(self.objective.terms, weighted) if self.term_params else []
        update = self.weighting.combine(ctx)
        self.optimizer.zero_grad(set_to_none=True)
        if update.grad is not None:
            unflatten_into(update.grad, self.params)
            try:
                coefficients = self.weighting.coefficients()  # crossbatch: eq. 11's, after combine
            except NotImplementedError:
                coefficients = {}
            gradients.set_own_gradients(own, coefficients)
        else:
            total = self.objective.total(weighted, {k: update.coefficients.get(k, 1.0) for k in weighted})
            if total is not None:
                total.backward()
            if self.dist.enabled:
                for p in self.params:
                    if p.grad is not None:
                        p.grad.copy_(self.dist.mean(p.grad))
        self._update(index)
        total = sum(weighted.values())
        if meter is not None:
            meter.add({**{f"loss/{k}": v for k, v in raw.items()}, "loss/total": total})
            meter.add_info({f"weighting/{k}": v for k, v in update.info.items()})
        return raw, total
