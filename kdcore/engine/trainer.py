"""The training loop: one student, an optional frozen teacher, a weighted objective.

:class:`Trainer` holds what one run needs and nothing global; :meth:`Trainer.fit`
runs epochs, evaluates, logs and checkpoints into the run directory (rank 0
only), and resumes from ``checkpoints/last.pt`` to exactly the weights of an
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdcore import config as cfg
from kdcore.engine import distributed
from kdcore.engine.batches import Batches, epoch_generator, eval_batches
from kdcore.engine.models import build_model
from kdcore.engine.objective import Objective
from kdcore.engine.rundir import JsonLines, Scalars, atomic_torch_save, atomic_write, dumps_record
from kdcore.errors import ConfigError
from kdcore.registry import Registry
from kdcore.schedule import Progress
from kdcore.weighting import GradientContext, GradientWeighting, unflatten_into

CHECKPOINT_VERSION = 1


def pick_device(kind: str, local_rank: int = 0) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("run.device: 'cuda' asked for but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class Meter:
    """Sums of per-step values kept on the device (no sync until read)."""

    def __init__(self):
        self.sums: dict[str, Tensor] = {}
        self.info: dict[str, float] = {}
        self.info_counts: dict[str, int] = {}
        self.steps = 0

    def add(self, values: Mapping[str, Tensor]) -> None:
        for k, v in values.items():
            v = v.detach()
            if k in self.sums:
                self.sums[k] += v
            else:
                self.sums[k] = v.clone().float()
        self.steps += 1

    def add_info(self, info: Mapping[str, float]) -> None:
        for k, v in info.items():
            self.info[k] = self.info.get(k, 0.0) + float(v)
            self.info_counts[k] = self.info_counts.get(k, 0) + 1

    def means(self, reduce) -> dict[str, float]:
        out = {}
        for k, v in self.sums.items():
            out[k] = float(reduce(v / max(self.steps, 1)))
        for k, v in self.info.items():
            out[k] = v / self.info_counts[k]
        return out


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
        if run.batch_size < self.dist.world:
            raise ConfigError(f"run.batch_size: {run.batch_size} is smaller than the {self.dist.world} processes")
        self.out = Path(out_dir) if out_dir is not None else None
        if run.threads:
            torch.set_num_threads(run.threads)
        if run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fastest convolution algorithms for fixed shapes
        torch.manual_seed(run.seed)

        self.objective = Objective.from_config(config, registry)  # cheap checks first
        self.weighting = self._build_weighting()
        try:
            self.data = registry.create("dataset", config.data.name, **config.data.params)
        except ConfigError as exc:
            raise exc.with_path("data") from None
        self.student = build_model(config.student, "student", self.data, registry, config.source).to(self.device)
        self.teacher: nn.Module | None = None
        self.teacher_forward: nn.Module | None = None  # the teacher, compiled with run.compile
        if config.teacher is not None:
            if config.teacher.checkpoint is None:
                raise ConfigError("teacher.checkpoint: required (the teacher's trained weights)")
            self.teacher = build_model(config.teacher, "teacher", self.data, registry, config.source)
            self.teacher.to(self.device).eval().requires_grad_(False)
            self.teacher_forward = self.teacher
        if run.channels_last:
            self.student.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = self._build_optimizer()
        self.scaler = torch.amp.GradScaler("cuda") if run.amp == "fp16" else None

        self.model = self.student
        if self.dist.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if run.compile:
            self.model = torch.compile(self.model)
            if self.teacher is not None:
                self.teacher_forward = torch.compile(self.teacher)
        pin = self.device.type == "cuda"
        self.batches = Batches(self.data.train, batch_size=run.batch_size, device=self.device,
                               rank=self.dist.rank, world=self.dist.world, num_workers=run.num_workers,
                               pin_memory=pin)
        self.epoch, self.step = 0, 0
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
        return w

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        if o.name == "sgd":
            return torch.optim.SGD(self.params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                   weight_decay=o.weight_decay)
        return torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)

    def lr_factor(self, epoch: int) -> float:
        """Learning-rate multiplier for ``epoch`` (from 1)."""
        o = self.config.optim
        if o.lr_schedule == "step":
            return o.gamma ** sum(epoch > m for m in o.milestones)
        if o.lr_schedule == "cosine":
            floor = o.min_lr / o.lr
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / self.config.run.epochs))
        return 1.0

    # -- one step -----------------------------------------------------------------------------
    def autocast(self):
        amp = self.config.run.amp
        if amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def _inputs(self, x: Tensor) -> Tensor:
        if self.config.run.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def teacher_logits(self, x: Tensor, needed: bool = True) -> Tensor | None:
        if self.teacher is None or not needed:
            return None
        with torch.no_grad():
            return self.teacher_forward(x)

    def progress(self) -> Progress:
        return Progress(max(self.epoch, 1), self.step, self.config.run.epochs, len(self.batches))

    def train_step(self, x: Tensor, y: Tensor, meter: Meter | None = None,
                   aux=None) -> dict[str, Tensor]:
        """One optimizer step on a batch; returns the unweighted term losses."""
        x = self._inputs(x)
        progress = self.progress()
        weights = self.objective.weights(progress)
        if self.weighting is not None and self.weighting.wants_gradients(progress):
            losses = self._gradient_step(x, y, weights, progress, aux, meter)
        else:
            coefs = weights
            if self.weighting is not None:
                c = self.weighting.coefficients()
                coefs = {k: w * float(c.get(k, 1.0)) for k, w in weights.items()}
            with self.autocast():
                s = self.model(x)
                t = self.teacher_logits(x, any(term.uses_teacher for term in self.objective.active(coefs)))
                losses = self.objective.losses(s, t, y, coefs)
                total = self.objective.total(losses, coefs)
            self.optimizer.zero_grad(set_to_none=True)
            if total is None:  # every weight is 0 at this step: nothing to learn from
                total = torch.zeros((), device=self.device)
            elif self.scaler is not None:
                self.scaler.scale(total).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                total.backward()
                self.optimizer.step()
            if meter is not None:
                meter.add({**{f"loss/{k}": v for k, v in losses.items()}, "loss/total": total})
        self.step += 1
        return losses

    def _gradient_step(self, x, y, weights, progress, aux, meter) -> dict[str, Tensor]:
        """A step through the gradient-aware seam (per-term gradients, reduced over ranks)."""
        module = self.student  # not the DDP wrapper: gradients are reduced explicitly

        def term_losses(xb, yb, names=None):
            needs_teacher = any(t.uses_teacher for t in self.objective.active(weights, names))
            with self.autocast():
                s = module(xb)
                raw = self.objective.losses(s, self.teacher_logits(xb, needs_teacher), yb, weights, names)
            return raw, {k: weights[k] * v for k, v in raw.items()}

        raw, weighted = term_losses(x, y)
        aux_fn = None
        if self.weighting.needs_aux_batch:
            def aux_fn(names=None):
                xa, ya = next(aux)
                return term_losses(self._inputs(xa), ya, names)[1]
        ctx = GradientContext(weighted, self.objective.roles(), self.params, progress, aux_fn, self.dist.mean)
        update = self.weighting.combine(ctx)
        self.optimizer.zero_grad(set_to_none=True)
        if update.grad is not None:
            unflatten_into(update.grad, self.params)
        else:
            total = self.objective.total(weighted, {k: update.coefficients.get(k, 1.0) for k in weighted})
            if total is not None:
                total.backward()
            if self.dist.enabled:
                for p in self.params:
                    if p.grad is not None:
                        p.grad.copy_(self.dist.mean(p.grad))
        self.optimizer.step()
        if meter is not None:
            meter.add({**{f"loss/{k}": v for k, v in raw.items()},
                       "loss/total": sum(weighted.values())})
            meter.add_info({f"weighting/{k}": v for k, v in update.info.items()})
        return raw

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split, prefix: str, model: nn.Module | None = None) -> dict[str, float]:
        """Accuracy (and distance to the Bayes posterior where the data know it)."""
        if split is None:
            return {}
        model = model or self.student
        was_training = model.training
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # correct, n, tv, l2
        has_post = getattr(split, "posterior", None) is not None
        for x, y, post in eval_batches(split, self.config.run.eval_batch_size, self.device,
                                       self.dist.rank, self.dist.world, self.config.run.num_workers):
            with self.autocast():
                logits = model(self._inputs(x))
            sums[0] += (logits.argmax(-1) == y).sum()
            sums[1] += y.numel()
            if post is not None:
                diff = torch.softmax(logits.float(), -1) - post
                sums[2] += 0.5 * diff.abs().sum(-1).sum()
                sums[3] += diff.norm(dim=-1).sum()
        model.train(was_training)
        self.dist.sum_(sums)
        n = max(sums[1].item(), 1)
        out = {f"{prefix}_acc": sums[0].item() / n}
        if has_post:
            out[f"{prefix}_tv"] = sums[2].item() / n
            out[f"{prefix}_l2"] = sums[3].item() / n
        return out

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "weighting": None if self.weighting is None else self.weighting.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_val_acc": self.best_val_acc,
            "best_epoch": self.best_epoch,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "config": cfg.dumps(self.config),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.weighting is not None and state.get("weighting") is not None:
            self.weighting.load_state_dict(state["weighting"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best_val_acc, self.best_epoch = state["best_val_acc"], state["best_epoch"]
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    # -- the loop -----------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if not self.quiet and self.dist.is_main:
            print(text, file=sys.stderr, flush=True)

    def _bar(self, total: int, epoch: int):
        mode = "off" if self.quiet else self.config.run.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        if mode != "bar" or not self.dist.is_main:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"epoch {epoch}/{self.config.run.epochs}", leave=False,
                    dynamic_ncols=True, file=sys.stderr)

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train for ``run.epochs`` epochs; returns the summary written to ``summary.json``."""
        run, main = self.config.run, self.dist.is_main
        out = self.out
        ckpt_dir = out / "checkpoints" if out is not None else None
        metrics = JsonLines(out / "metrics.jsonl") if out is not None else None
        steps_log = JsonLines(out / "steps.jsonl") if out is not None else None
        if resume:
            last = ckpt_dir / "last.pt" if ckpt_dir is not None else None
            if last is None or not last.exists():
                raise ConfigError(f"--resume: no checkpoint to resume from at {last}")
            state = torch.load(last, map_location=self.device, weights_only=True)
            if state.get("config") != cfg.dumps(self.config):
                self._say("kdcore: note: the configuration differs from the checkpoint's; resuming anyway")
            self.load_state_dict(state)
            self._say(f"resuming from {last} (epoch {self.epoch}, step {self.step})")
        if main and out is not None:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "config.toml", cfg.dumps(self.config))
            if resume:
                metrics.truncate_after(self.step)
                steps_log.truncate_after(self.step)
            else:
                for f in (metrics.path, steps_log.path):
                    f.unlink(missing_ok=True)
        tb = Scalars(out / "tb", purge_step=self.step if resume else None) if main and out is not None else None
        started = time.perf_counter()
        last_record: dict[str, Any] = {}
        try:
            while self.epoch < run.epochs:
                self.epoch += 1
                last_record = self._run_epoch(metrics, steps_log, tb) or last_record
                if main and ckpt_dir is not None:
                    atomic_torch_save(self.state_dict(), ckpt_dir / "last.pt")
                self.dist.barrier()
            summary = self._summary(last_record, time.perf_counter() - started, metrics)
            if main and out is not None:
                atomic_write(out / "summary.json", dumps_record(summary, indent=2) + "\n")
        finally:
            if tb is not None:
                tb.close()
        return summary

    def _run_epoch(self, metrics, steps_log, tb) -> dict[str, Any] | None:
        run, main = self.config.run, self.dist.is_main
        lr = self.config.optim.lr * self.lr_factor(self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.student.train()
        meter = Meter()
        aux = None
        if self.weighting is not None and self.weighting.needs_aux_batch:
            aux = _cycle(self.batches, epoch_generator(run.seed, self.epoch, stream=1))
        bar = self._bar(len(self.batches), self.epoch)
        t0 = time.perf_counter()
        for x, y in self.batches.epoch(epoch_generator(run.seed, self.epoch)):
            losses = self.train_step(x, y, meter, aux)
            if bar is not None:
                bar.update(1)
            if self.step % run.log_every == 0 and main and (tb is not None or steps_log is not None):
                rec = {"epoch": self.epoch, "step": self.step,
                       **{f"loss/{k}": float(v.detach()) for k, v in losses.items()},
                       **{f"weight/{k}": w for k, w in self.objective.weights(self.progress()).items()}}
                if tb is not None:
                    tb.add({k: v for k, v in rec.items() if k not in ("epoch", "step")}, self.step)
                if steps_log is not None:
                    steps_log.append(rec)
        if bar is not None:
            bar.close()
        means = meter.means(self.dist.mean)  # every rank takes part in the reduction
        if self.epoch % run.eval_every and self.epoch != run.epochs:
            return None
        record: dict[str, Any] = {"epoch": self.epoch, "step": self.step, **means,
                                  **{f"weight/{k}": w for k, w in self.objective.weights(self.progress()).items()},
                                  "lr": self.optimizer.param_groups[0]["lr"]}
        record.update(self.evaluate(self.data.val, "val"))
        record["epoch_time_s"] = round(time.perf_counter() - t0, 4)
        val_acc = record.get("val_acc")
        if val_acc is not None and (self.best_val_acc is None or val_acc > self.best_val_acc):
            self.best_val_acc, self.best_epoch = val_acc, self.epoch
            if main and self.out is not None:
                atomic_torch_save({"model": self.student.state_dict(), "epoch": self.epoch,
                                   "step": self.step, "val_acc": val_acc},
                                  self.out / "checkpoints" / "best.pt")
        if main:
            if metrics is not None:
                metrics.append(record)
            if tb is not None:
                tb.add({k: v for k, v in record.items() if k not in ("epoch", "step")}, self.step)
            shown = "  ".join(f"{k.removeprefix('loss/')} {v:.4f}" for k, v in record.items()
                              if k.startswith("loss/") or k.startswith("val_"))
            self._say(f"epoch {self.epoch}/{run.epochs}  {shown}  ({record['epoch_time_s']:.1f}s)")
        return record

    def _summary(self, last_record, elapsed, metrics) -> dict[str, Any]:
        summary: dict[str, Any] = {"epochs": self.epoch, "steps": self.step,
                                   "best_val_acc": self.best_val_acc, "best_epoch": self.best_epoch}
        summary.update(self.evaluate(self.data.test, "test"))
        if self.teacher is not None:
            summary.update({f"teacher_{k}": v for k, v in self.evaluate(self.data.test, "test", self.teacher).items()})
        summary["final"] = last_record
        summary["train_time_s"] = round(elapsed, 3)
        return summary


def _cycle(batches: Batches, generator: torch.Generator):
    """An endless stream of batches from independent shuffles (the auxiliary batch)."""
    while True:
        yield from batches.epoch(generator)
