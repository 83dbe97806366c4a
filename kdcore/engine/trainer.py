"""What one run needs, and one optimizer step.

:class:`Trainer` builds the student, the frozen teacher, the objective (with
the loss terms' own parameters), the optimizer and the batches from a
validated :class:`kdcore.config.Config`, and nothing global. :meth:`Trainer.train_step`
is one optimizer step over ``run.accumulate`` micro-batches;
:meth:`Trainer.fit` runs the loop of :mod:`kdcore.engine.loop`; the checkpoint
format is in :mod:`kdcore.engine.checkpoints`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdcore import config as cfg
from kdcore.engine import allocator, checkpoints, distributed, step, teacher_source
from kdcore.engine.batches import Batch, Batches, eval_batches
from kdcore.engine.memory import StepMemory
from kdcore.engine.meter import Meter
from kdcore.engine.models import build_model
from kdcore.engine.objective import Objective
from kdcore.errors import ConfigError
from kdcore.functional import IGNORE_INDEX
from kdcore.outputs import Outputs
from kdcore.policy import StepContext
from kdcore.registry import Registry
from kdcore.schedule import Progress
from kdcore.weighting import GradientContext, GradientWeighting, unflatten_into


def pick_device(kind: str, local_rank: int = 0) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("run.device: 'cuda' asked for but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class Trainer:
    """Everything one run needs, built from a validated :class:`kdcore.config.Config`."""

    def __init__(self, config: cfg.Config, out_dir: str | Path | None, registry: Registry, *,
                 quiet: bool = False):
        self.config, self.registry, self.quiet = config, registry, quiet
        run = config.run
        self.dist = distributed.setup("cuda" if run.device == "cuda" or
                                      (run.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.device = pick_device(run.device, self.dist.local_rank)
        if run.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("run.amp: 'fp16' needs a CUDA device (use 'bf16' on the CPU)")
        if run.batch_size < self.dist.world * run.accumulate:
            raise ConfigError(f"run.batch_size: {run.batch_size} is smaller than {self.dist.world} process(es) "
                              f"x run.accumulate = {run.accumulate} micro-batches")
        self.out = Path(out_dir) if out_dir is not None else None
        if run.threads:
            torch.set_num_threads(run.threads)
        if run.malloc == "reuse":
            allocator.keep_freed_memory()
        if run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fastest convolution algorithms for fixed shapes
        torch.manual_seed(run.seed)

        self.objective = Objective.from_config(config, registry, self.dist.world)  # cheap checks first
        self.weighting = self._build_weighting()
        self.batch_policy = self._build_batch_policy()
        try:
            self.data = registry.create("dataset", config.data.name, **config.data.params)
        except ConfigError as exc:
            raise exc.with_path("data") from None
        self.student = build_model(config.student, "student", self.data, registry, config.source).to(self.device)
        self.teacher: nn.Module | None = None
        self.teacher_forward: nn.Module | None = None  # the teacher, compiled with run.compile
        if config.teacher is not None and config.teacher.signals.source == "model":
            self.teacher = build_model(config.teacher, "teacher", self.data, registry, config.source)
            if config.teacher.checkpoint is None and not getattr(self.teacher, "pretrained", False):
                raise ConfigError("teacher.checkpoint: required (the teacher's trained weights; a backbone "
                                  "that loads its own weights sets pretrained = True)")
            self.teacher.to(self.device).eval().requires_grad_(False)
            self.teacher_forward = self.teacher
        if run.channels_last:
            self.student.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
        self.objective.bind(self.student, self.teacher)
        self.objective.modules.to(self.device)
        pin = self.device.type == "cuda"
        self.batches = Batches(self.data.train, batch_size=run.batch_size, device=self.device,
                               rank=self.dist.rank, world=self.dist.world, num_workers=run.num_workers,
                               pin_memory=pin)
        #: the teacher's outputs per batch (the model, a cache of it, or a store; None: no teacher)
        self.teacher_source = teacher_source.build(config, self.data, self.objective, self.teacher,
                                                   self.teacher_forward, self.device, self.out)
        self.sharded = run.strategy == "fsdp" and self.dist.enabled
        self._materialise_lazy_terms()
        self.model = self._wrap_student()
        self.params = step.trainable(self.student.parameters())
        self.term_params = step.trainable(self.objective.modules.parameters())
        #: every optimised module, for the sharded optimizer state
        self.trained = nn.ModuleDict({"student": self.student, "losses": self.objective.modules})
        self.optimizer = self._build_optimizer()
        self.scaler = torch.amp.GradScaler("cuda") if run.amp == "fp16" else None
        self.buffer_sync = step.BufferSync(self.objective.modules, self.dist)
        #: the parameter groups whose gradient norms the guard reads: the student, each term with parameters
        self.grad_groups = {"the student's parameters": self.params, **{
            f"loss term {t.id!r}'s parameters": ps for t in self.objective.terms
            if isinstance(t.loss, nn.Module) and (ps := step.trainable(t.loss.parameters()))}}
        self.guard = step.FiniteGuard(self.device, [t.id for t in self.objective.terms], list(self.grad_groups))
        self.memory = StepMemory(self.device, run.measure_memory)
        if run.compile:
            self.model = torch.compile(self.model)
            if self.teacher is not None:
                self.teacher_forward = torch.compile(self.teacher)
                teacher_source.run_with(self.teacher_source, self.teacher_forward)
        self.epoch, self.step = 0, 0
        self.batch_in_epoch = 0  # batches of the current epoch done (a resume mid-epoch)
        self.meter: Meter | None = None
        self.aux_consumed = 0    # auxiliary batches drawn in the current epoch
        self.best_val_acc: float | None = None
        self.best_epoch: int | None = None

    # -- construction -------------------------------------------------------------------------
    def _build_weighting(self) -> GradientWeighting | None:
        wc = self.config.weighting
        if wc is None:
            return None
        try:
            w = self.registry.create("scheduler", wc.name, **wc.params)
        except ConfigError as exc:
            raise exc.with_path("weighting") from None
        if not isinstance(w, GradientWeighting):
            raise ConfigError(f"weighting.name: {wc.name!r} is not a gradient-aware scheduler "
                              "(use it as a term's schedule instead)")
        if self.config.run.amp == "fp16":
            raise ConfigError("run.amp: 'fp16' is not supported with [weighting] (use 'bf16')")
        if self.config.run.accumulate > 1:
            raise ConfigError("run.accumulate: gradient-aware [weighting] needs whole batches (accumulate = 1)")
        return w

    def _build_batch_policy(self):
        """The ``[batch_policy]`` component that replaces each step's batch (:mod:`kdcore.policy`), or None."""
        pc = self.config.batch_policy
        if pc is None:
            return None
        try:
            return self.registry.create("batch_policy", pc.name, **pc.params)
        except ConfigError as exc:
            raise exc.with_path("batch_policy") from None

    def _materialise_lazy_terms(self) -> None:
        """Run the loss terms once on the first batch, without learning, when a term
        creates its connectors from the features' shapes (lazy modules)."""
        if not any(isinstance(p, nn.parameter.UninitializedParameter)
                   for p in self.objective.modules.parameters()):
            return
        rng = torch.get_rng_state()
        batch = next(iter(self.batches.epoch(torch.Generator().manual_seed(0))))
        was = self.student.training
        self.student.eval()
        with torch.no_grad():
            weights = {t.id: 1.0 for t in self.objective.terms}
            s, t = self._outputs(batch, self.objective.active(weights), self.student)
            self.objective.losses(s, t, batch.target, weights)
        self.student.train(was)
        torch.set_rng_state(rng)

    def _wrap_student(self) -> nn.Module:
        if not self.dist.enabled:
            return self.student
        if self.sharded:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.dist.world,))
            fully_shard(self.student, mesh=mesh)
            return self.student
        return nn.parallel.DistributedDataParallel(
            self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        groups = [{"params": self.params}]
        if self.term_params:
            groups.append({"params": self.term_params})  # the loss terms' connectors
        if o.name == "sgd":
            return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                   weight_decay=o.weight_decay)
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)

    @property
    def term_parameter_count(self) -> int:
        """Trainable parameters the loss terms add (connectors, projections)."""
        return sum(p.numel() for p in self.term_params)

    # -- schedules ----------------------------------------------------------------------------
    def lr_factor(self, epoch: int, step_: int | None = None) -> float:
        """Learning-rate multiplier for ``epoch`` (from 1) at optimizer step ``step_``
        (steps before this one): the schedule (over steps under ``run.max_steps``)
        times the linear warm-up of ``optim.warmup_steps``."""
        o, run = self.config.optim, self.config.run
        step_ = self.step if step_ is None else step_
        factor = 1.0
        if o.lr_schedule == "step":
            factor = o.gamma ** sum(epoch > m for m in o.milestones)
        elif o.lr_schedule == "cosine":
            floor = o.min_lr / o.lr
            done = step_ / run.max_steps if run.max_steps else (epoch - 1) / run.epochs
            factor = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done))
        if o.warmup_steps and step_ < o.warmup_steps:
            factor *= (step_ + 1) / o.warmup_steps
        return factor

    def progress(self) -> Progress:
        return Progress(max(self.epoch, 1), self.step, self.config.run.epochs, len(self.batches),
                        self.config.run.max_steps)

    # -- one step -----------------------------------------------------------------------------
    def autocast(self):
        amp = self.config.run.amp
        if amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def _inputs(self, inputs):
        if self.config.run.channels_last and isinstance(inputs, Tensor) and inputs.dim() == 4:
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def _outputs(self, batch: Batch, terms, model: nn.Module) -> tuple[Outputs, Outputs | None]:
        """The student's outputs (through ``model``) and, where a term needs it, the
        teacher's (under ``no_grad``), with the taps the ``terms`` name."""
        inputs = self._inputs(batch.inputs)
        taps = self.objective.has_taps
        s = step.forward(model, inputs, self.student, self.objective.taps(terms, "student") if taps else (),
                         batch.index)
        if self.sharded:
            step.check_sharded_outputs(s)
        t = None
        if self.teacher_source is not None and any(term.uses_teacher for term in terms):
            with torch.no_grad():
                t = self.teacher_source(batch, inputs, self.objective.taps(terms, "teacher") if taps else ())
        return s, t

    def _no_sync(self, last: bool):
        """Skip the gradient all-reduce on all micro-batches but the last."""
        if last or not self.dist.enabled:
            return contextlib.nullcontext()
        if self.sharded:
            self.student.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.model.no_sync()

    def train_step(self, batch: Batch, meter: Meter | None = None, aux=None) -> dict[str, Tensor]:
        """One optimizer step on a batch; returns the unweighted term losses (the step's means)."""
        progress = self.progress()
        if self.batch_policy is not None:  # the step's batch, before any forward pass
            batch = self.batch_policy(batch, StepContext(
                self.student, self.teacher, progress, self.config.run.seed, self.device, self.dist.rank,
                self.dist.world, self.autocast))
        lr = self.config.optim.lr * self.lr_factor(progress.epoch)
        if lr != self.optimizer.param_groups[0]["lr"]:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        weights = self.objective.weights(progress)
        if self.weighting is not None and self.weighting.wants_gradients(progress):
            losses, total = self._gradient_step(batch, weights, progress, aux, meter)
        else:
            coefs = weights
            if self.weighting is not None:
                c = self.weighting.coefficients()
                coefs = {k: w * float(c.get(k, 1.0)) for k, w in weights.items()}
            losses, total = self._accumulated_step(batch, coefs)
            if meter is not None:
                meter.add({**{f"loss/{k}": v for k, v in losses.items()}, "loss/total": total})
        self.guard.observe(self.step + 1, losses, total)
        self.step += 1
        return losses

    def _accumulated_step(self, batch: Batch, coefs: Mapping[str, float]) -> tuple[dict[str, Tensor], Tensor]:
        """Forward and backward over ``run.accumulate`` micro-batches, then one update."""
        active = self.objective.active(coefs)
        micros = batch.split(self.config.run.accumulate)
        factors = step.micro_weights(micros, self.dist)
        shares = step.local_shares(micros)
        self.optimizer.zero_grad(set_to_none=True)
        if self.buffer_sync:
            self.buffer_sync.snapshot()
        logged: dict[str, Tensor] = {}
        stepped = False
        for i, mb in enumerate(micros):
            with self._no_sync(last=i == len(micros) - 1), self.autocast():
                s, t = self._outputs(mb, active, self.model)
                losses = self.objective.losses(s, t, mb.target, coefs)
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
            return {}, torch.zeros((), device=self.device)
        self._update()
        if shares is not None:
            step_total = self.objective.total(logged, coefs)
        return logged, step_total

    def _update(self) -> None:
        """Synchronise what DDP/FSDP do not, clip, and take the optimizer step."""
        step.average_gradients(self.term_params, self.dist)
        clip = self.config.optim.clip_grad_norm
        if clip and self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if clip or self.scaler is None:  # fp16's scaler skips steps with non-finite gradients itself
            groups = list(self.grad_groups.values())
            norms = step.gradient_norms(groups) if clip else step.gradient_checks(groups)
            if self.scaler is None:
                self.guard.observe_gradients(self.step + 1, norms)
            if clip:
                step.clip_gradients(groups, clip, norms)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.buffer_sync:
            self.buffer_sync.sync()

    def _gradient_step(self, batch: Batch, weights, progress, aux, meter) -> tuple[dict[str, Tensor], Tensor]:
        """A step through the gradient-aware seam (per-term gradients, reduced over ranks)."""
        module = self.student  # not the DDP wrapper: gradients are reduced explicitly

        def term_losses(b: Batch, names=None):
            terms = self.objective.active(weights, names)
            with self.autocast():
                s, t = self._outputs(b, terms, module)
                raw = self.objective.losses(s, t, b.target, weights, names)
            return raw, {k: weights[k] * v for k, v in raw.items()}

        raw, weighted = term_losses(batch)
        aux_fn = None
        if self.weighting.needs_aux_batch:
            def aux_fn(names=None):
                return term_losses(next(aux), names)[1]
        ctx = GradientContext(weighted, self.objective.roles(), self.params, progress, aux_fn, self.dist.mean)
        own = step.own_gradients(self.objective.terms, weighted) if self.term_params else []
        update = self.weighting.combine(ctx)
        self.optimizer.zero_grad(set_to_none=True)
        if update.grad is not None:
            unflatten_into(update.grad, self.params)
            try:
                coefficients = self.weighting.coefficients()  # crossbatch: eq. 11's, after combine
            except NotImplementedError:
                coefficients = {}
            step.set_own_gradients(own, coefficients)
        else:
            total = self.objective.total(weighted, {k: update.coefficients.get(k, 1.0) for k in weighted})
            if total is not None:
                total.backward()
            if self.dist.enabled:
                for p in self.params:
                    if p.grad is not None:
                        p.grad.copy_(self.dist.mean(p.grad))
        self._update()
        total = sum(weighted.values())
        if meter is not None:
            meter.add({**{f"loss/{k}": v for k, v in raw.items()}, "loss/total": total})
            meter.add_info({f"weighting/{k}": v for k, v in update.info.items()})
        return raw, total

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split, prefix: str, model: nn.Module | None = None, *,
                 agreement: bool = False) -> dict[str, float]:
        """Accuracy and mean negative log-likelihood over kept positions (token-level for
        sequences, with the perplexity ``exp(nll)``), the distances to the Bayes posterior
        where the data know it, and with ``agreement`` the top-1 agreement with the teacher."""
        if split is None:
            return {}
        model = model or self.student
        agreement = agreement and self.teacher is not None and model is not self.teacher
        was_training = model.training
        model.eval()
        sums = torch.zeros(7, dtype=torch.float64, device=self.device)  # correct, n, tv, l2, kl, nll, agree
        has_post = getattr(split, "posterior", None) is not None
        sequences = False
        for batch, post in eval_batches(split, self.config.run.eval_batch_size, self.device,
                                        self.dist.rank, self.dist.world, self.config.run.num_workers):
            with self.autocast():
                logits = step.forward(model, self._inputs(batch.inputs), model, (), batch.index).logits
                if agreement:
                    taught = step.forward(self.teacher, self._inputs(batch.inputs), self.teacher, (),
                                          batch.index).logits
            keep = batch.target != IGNORE_INDEX
            sequences = batch.target.dim() > 1
            top = logits.argmax(-1)
            sums[0] += ((top == batch.target) & keep).sum()
            sums[1] += keep.sum()
            logq = torch.log_softmax(logits.float(), -1)
            picked = logq.gather(-1, batch.target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            sums[5] -= torch.where(keep, picked, 0.0).sum()
            if agreement:
                sums[6] += ((taught.argmax(-1) == top) & keep).sum()
            if post is not None:  # distances to the true distribution over the kept positions
                diff = logq.exp() - post
                kl = torch.where(post > 0, post * (post.clamp(min=1e-30).log() - logq), 0.0).sum(-1)
                sums[2] += torch.where(keep, 0.5 * diff.abs().sum(-1), 0.0).sum()
                sums[3] += torch.where(keep, diff.norm(dim=-1), 0.0).sum()
                sums[4] += torch.where(keep, kl, 0.0).sum()
        model.train(was_training)
        self.dist.sum_(sums)
        n = max(sums[1].item(), 1)
        out = {f"{prefix}_acc": sums[0].item() / n, f"{prefix}_nll": sums[5].item() / n}
        if sequences:
            out[f"{prefix}_ppl"] = math.exp(min(out[f"{prefix}_nll"], 700.0))
        if agreement:
            out[f"{prefix}_agreement"] = sums[6].item() / n
        if has_post:
            out[f"{prefix}_tv"] = sums[2].item() / n
            out[f"{prefix}_l2"] = sums[3].item() / n
            out[f"{prefix}_kl"] = sums[4].item() / n  # KL(truth || model)
        return out

    # -- checkpoints --------------------------------------------------------------------------
    def student_state(self) -> dict[str, Any]:
        """The student's full state dict (a collective on every rank when sharded)."""
        return checkpoints.model_state(self.student, self.sharded)

    def state_dict(self) -> dict[str, Any]:
        """Everything ``--resume`` needs (see :mod:`kdcore.engine.checkpoints`)."""
        return {
            "version": checkpoints.VERSION,
            "model": self.student_state(),
            "losses": self.objective.modules.state_dict(),
            "optimizer": checkpoints.optimizer_state(self.trained, self.optimizer, self.sharded),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "weighting": None if self.weighting is None else self.weighting.state_dict(),
            "epoch": self.epoch if self.batch_in_epoch == 0 else self.epoch - 1,
            "batch_in_epoch": self.batch_in_epoch,
            "meter": None if self.batch_in_epoch == 0 or self.meter is None else self.meter.state_dict(),
            "aux_consumed": self.aux_consumed if self.batch_in_epoch else 0,
            "step": self.step,
            "best_val_acc": self.best_val_acc,
            "best_epoch": self.best_epoch,
            "rng": checkpoints.rng_state(),
            "config": cfg.dumps(self.config),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        checkpoints.load_model_state(self.student, state["model"], self.sharded)
        self.objective.modules.load_state_dict(state.get("losses", {}))
        checkpoints.load_optimizer_state(self.trained, self.optimizer, state["optimizer"], self.sharded)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.weighting is not None and state.get("weighting") is not None:
            self.weighting.load_state_dict(state["weighting"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.aux_consumed = int(state.get("aux_consumed", 0))
        self.meter = None
        if state.get("meter") is not None:
            self.meter = Meter()
            self.meter.load_state_dict(state["meter"], self.device)
        self.best_val_acc, self.best_epoch = state["best_val_acc"], state["best_epoch"]
        checkpoints.set_rng_state(state["rng"])

    def fit(self, resume: bool = False, state: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Train for ``run.epochs`` epochs (or ``run.max_steps`` steps); returns the summary.
        ``state``: the ``last.pt`` to resume from, where the caller has read it."""
        from kdcore.engine.loop import fit

        return fit(self, resume=resume, state=state)
