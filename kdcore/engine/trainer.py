"""A run, built from its config in one pass, and its state.

:class:`Trainer` resolves a validated :class:`kdcore.config.Config` top to
bottom, each concern once: the process (:mod:`~kdcore.engine.runtime`), the
loss terms and their weighting (:mod:`~kdcore.engine.objective`), the data and
the models (:mod:`~kdcore.engine.models`), the teacher's signals
(:mod:`~kdcore.engine.teacher_source`), the batches, the distributed wrapper,
the optimizer (:mod:`~kdcore.engine.optim`) and the step
(:mod:`~kdcore.engine.step`). It holds what a run's position is (epoch, step,
best metric) and its checkpoint state (:mod:`~kdcore.engine.checkpoints`);
:meth:`Trainer.fit` runs the loop of :mod:`kdcore.engine.loop`, and
:meth:`Trainer.evaluate` the metrics of :mod:`kdcore.engine.evaluate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdcore import config as cfg
from kdcore.common.errors import ConfigError
from kdcore.engine import checkpoints, distributed, optim, teacher_source
from kdcore.engine.best import BestMetric, resolve as resolve_best_metric
from kdcore.engine.batches import Batch, Batches
from kdcore.engine.evaluate import evaluate
from kdcore.engine.forward import Forward, materialise_lazy_terms
from kdcore.engine.gradients import trainable
from kdcore.engine.memory import StepMemory
from kdcore.engine.meter import Meter
from kdcore.engine.models import build_backbone, build_data, build_teacher
from kdcore.engine.objective import Objective, build_batch_policy, build_weighting
from kdcore.engine.runtime import Runtime
from kdcore.engine.step import Step
from kdcore.losses.schedule import Progress
from kdcore.losses.weighting import GradientWeighting
from kdcore.plugins.registry import Registry


class Trainer:
    """Everything one run needs, built from a validated :class:`kdcore.config.Config`."""

    def __init__(self, config: cfg.Config, out_dir: str | Path | None, registry: Registry, *,
                 quiet: bool = False):
        self.config, self.registry, self.quiet = config, registry, quiet
        self.out = Path(out_dir) if out_dir is not None else None
        run = config.run
        self.runtime = Runtime.start(run)
        self.dist, self.device = self.runtime.dist, self.runtime.device
        # the terms first: their checks are the cheapest
        self.objective = Objective.from_config(config, registry, self.dist.world)
        weighting, batch_policy = build_weighting(config, registry), build_batch_policy(config, registry)
        if config.teachers is not None and batch_policy is not None:
            raise ConfigError("batch_policy: works with one teacher ([teacher]); this config has "
                              f"{len(config.teachers)} ([teachers.NAME])")
        self.data = build_data(config, registry)
        self.student = build_backbone(config.student, "student", self.data, registry, config.source)
        self.student.to(self.device)
        #: the frozen teacher models by name (None for a stored teacher); {} without a teacher
        self.teachers: dict[str, nn.Module | None] = {
            name: build_teacher(config, self.data, registry, name).to(self.device)
            if tc.signals.source == "model" else None for name, tc in config.teacher_tables().items()}
        #: the one teacher's model (None without one, with a store in its place, or with several teachers)
        self.teacher: nn.Module | None = self.teachers.get(cfg.ONE_TEACHER) if config.teachers is None else None
        if run.channels_last:
            for model in filter(None, (self.student, *self.teachers.values())):
                model.to(memory_format=torch.channels_last)
        self.objective.bind(self.student, self.teacher if config.teachers is None else self.teachers)
        self.objective.modules.to(self.device)
        self.batches = Batches(self.data.train, batch_size=run.batch_size, device=self.device,
                               rank=self.dist.rank, world=self.dist.world, num_workers=run.num_workers,
                               pin_memory=self.device.type == "cuda")
        #: the teacher's outputs per batch (the model, a cache of it, or a store; None: no teacher),
        #: with several teachers a mapping by name of these
        self.teacher_source = teacher_source.build_all(config, self.data, self.objective, self.teachers,
                                                       self.device, self.out)
        self.sharded = run.strategy == "fsdp" and self.dist.enabled
        self.forward = Forward(self.runtime, self.student, self.objective, self.teacher_source, self.sharded)
        materialise_lazy_terms(self.forward, self.batches)
        self.model = distributed.wrap(self.student, self.device, self.dist, self.sharded)
        if run.compile:
            self.model = torch.compile(self.model)
            sources = self.teacher_source if config.teachers is not None else {cfg.ONE_TEACHER: self.teacher_source}
            for name, model in self.teachers.items():
                if model is not None:
                    teacher_source.run_with(sources[name], torch.compile(model))
        #: every optimised module, for the sharded optimizer state
        self.trained = nn.ModuleDict({"student": self.student, "losses": self.objective.modules})
        self.params = trainable(self.student.parameters())  # after wrapping: FSDP2 replaces them
        self.term_params = trainable(self.objective.modules.parameters())
        self.optimizer = optim.build_optimizer(config.optim, self.params, self.term_params)
        self.stepper = Step(self.runtime, self.forward, self.objective, self.student, self.model, self.teacher,
                            self.optimizer, self.params, self.term_params, accumulate=run.accumulate, clip_grad_norm=config.optim.clip_grad_norm,
                            seed=run.seed, sharded=self.sharded, weighting=weighting,
                            batch_policy=batch_policy)
        self.memory = StepMemory(self.device, run.measure_memory)
        self.epoch, self.step = 0, 0
        self.batch_in_epoch = 0  # batches of the current epoch done (a resume mid-epoch)
        self.meter: Meter | None = None
        self.aux_consumed = 0    # auxiliary batches drawn in the current epoch
        #: the metric best.pt keeps (run.best_metric) and its best value so far
        self.best = BestMetric(resolve_best_metric(
            run.best_metric, token_level=teacher_source.target_shape(self.data.train) != (),
            has_truth=getattr(self.data.val, "posterior", None) is not None))
        self.best_val_acc: float | None = None  # val_acc at the best epoch

    @property
    def best_epoch(self) -> int | None:
        """The epoch whose evaluation best.pt holds (None before one)."""
        return self.best.epoch

    @property
    def weighting(self) -> GradientWeighting | None:
        """The ``[weighting]`` of the steps (None: the terms' own weights)."""
        return self.stepper.weighting

    @weighting.setter
    def weighting(self, value: GradientWeighting | None) -> None:
        self.stepper.weighting = value

    @property
    def batch_policy(self):
        """The ``[batch_policy]`` that replaces each step's batch (None: the data's batches)."""
        return self.stepper.batch_policy

    @property
    def term_parameter_count(self) -> int:
        """Trainable parameters the loss terms add (connectors, projections)."""
        return sum(p.numel() for p in self.term_params)

    @property
    def guard(self):
        """The finiteness guard of the steps (:class:`kdcore.engine.gradients.FiniteGuard`)."""
        return self.stepper.guard

    # -- schedules and the step ---------------------------------------------------------------
    def lr_factor(self, epoch: int, step_: int | None = None) -> float:
        """Learning-rate multiplier for ``epoch`` (from 1) at optimizer step ``step_``
        (default: the steps done), see :func:`kdcore.engine.optim.lr_factor`."""
        return optim.lr_factor(self.config.optim, self.config.run, epoch, self.step if step_ is None else step_)

    def progress(self) -> Progress:
        return Progress(max(self.epoch, 1), self.step, self.config.run.epochs, len(self.batches),
                        self.config.run.max_steps)

    def train_step(self, batch: Batch, meter: Meter | None = None, aux=None) -> dict[str, Tensor]:
        """One optimizer step on a batch; returns the unweighted term losses (the step's means)."""
        progress = self.progress()
        lr = self.config.optim.lr * self.lr_factor(progress.epoch)
        losses = self.stepper(batch, progress, lr, self.step + 1, meter, aux)
        self.step += 1
        return losses

    def evaluate(self, split, prefix: str, model: nn.Module | None = None, *,
                 references: Mapping[str, Tensor] | None = None) -> dict[str, float]:
        """:func:`kdcore.engine.evaluate.evaluate` of ``model`` (default: the student); with
        ``references`` its agreement with the teachers' kept predictions (see there)."""
        return evaluate(model or self.student, split, prefix, self.runtime,
                        batch_size=self.config.run.eval_batch_size, num_workers=self.config.run.num_workers,
                        references=references)

    # -- checkpoints --------------------------------------------------------------------------
    def student_state(self) -> dict[str, Any]:
        """The student's full state dict (a collective on every rank when sharded)."""
        return checkpoints.model_state(self.student, self.sharded)

    def state_dict(self) -> dict[str, Any]:
        """Everything ``--resume`` needs (see :mod:`kdcore.engine.checkpoints`)."""
        scaler = self.stepper.scaler
        return {
            "version": checkpoints.VERSION,
            "model": self.student_state(),
            "losses": self.objective.modules.state_dict(),
            "optimizer": checkpoints.optimizer_state(self.trained, self.optimizer, self.sharded),
            "scaler": None if scaler is None else scaler.state_dict(),
            "weighting": None if self.weighting is None else self.weighting.state_dict(),
            "epoch": self.epoch if self.batch_in_epoch == 0 else self.epoch - 1,
            "batch_in_epoch": self.batch_in_epoch,
            "meter": None if self.batch_in_epoch == 0 or self.meter is None else self.meter.state_dict(),
            "aux_consumed": self.aux_consumed if self.batch_in_epoch else 0,
            "step": self.step,
            "best_val_acc": self.best_val_acc,
            **self.best.state_dict(),
            "rng": checkpoints.rng_state(),
            "config": cfg.dumps(self.config),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        checkpoints.load_model_state(self.student, state["model"], self.sharded)
        self.objective.modules.load_state_dict(state.get("losses", {}))
        checkpoints.load_optimizer_state(self.trained, self.optimizer, state["optimizer"], self.sharded)
        if self.stepper.scaler is not None and state.get("scaler"):
            self.stepper.scaler.load_state_dict(state["scaler"])
        if self.weighting is not None and state.get("weighting") is not None:
            self.weighting.load_state_dict(state["weighting"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.aux_consumed = int(state.get("aux_consumed", 0))
        self.meter = None
        if state.get("meter") is not None:
            self.meter = Meter()
            self.meter.load_state_dict(state["meter"], self.device)
        self.best.load_state_dict(state)
        self.best_val_acc = state["best_val_acc"] if self.best.epoch is not None else None
        checkpoints.set_rng_state(state["rng"])

    def fit(self, resume: bool = False, state: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Train for ``run.epochs`` epochs (or ``run.max_steps`` steps); returns the summary.
        ``state``: the ``last.pt`` to resume from, where the caller has read it."""
        from kdcore.engine.loop import fit

        return fit(self, resume=resume, state=state)
