"""The training loop and its logging: epochs, evaluation, metrics, checkpoints.

:func:`fit` runs a :class:`~kdcore.engine.trainer.Trainer` to the end of
``run.epochs`` (or ``run.max_steps`` optimizer steps), evaluating and writing
``metrics.jsonl``, ``steps.jsonl``, TensorBoard scalars and checkpoints
(rank 0 only), and resumes from ``checkpoints/last.pt``, written at every
epoch end and every ``run.checkpoint_every`` steps, to exactly the weights of
an uninterrupted run.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import attrs
import torch

from kdcore import config as cfg
from kdcore.common.errors import ConfigError
from kdcore.common.files import atomic_torch_save, atomic_write
from kdcore.engine import teacher_eval
from kdcore.engine.batches import Batches, batch_index_lists, epoch_generator
from kdcore.engine.checkpoints import check_resume, load_checkpoint
from kdcore.engine.logs import JsonLines, Scalars, dumps_record
from kdcore.engine.meter import Meter


class AuxStream:
    """An endless stream of batches from successive shuffles (the gradient-aware
    weighting's auxiliary batch), resumable after ``consumed`` batches."""

    def __init__(self, batches: Batches, generator: torch.Generator, consumed: int = 0):
        self.batches, self.generator, self.consumed = batches, generator, consumed
        per_pass = max(len(batches), 1)
        for _ in range(consumed // per_pass):  # replay the shuffles of whole passes
            batch_index_lists(len(batches.split), batches.batch_size, batches.rank, batches.world, generator)
        self._it = batches.epoch(generator, skip=consumed % per_pass)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            batch = next(self._it)
        except StopIteration:
            self._it = self.batches.epoch(self.generator)
            batch = next(self._it)
        self.consumed += 1
        return batch


def _say(trainer, text: str) -> None:
    if not trainer.quiet and trainer.dist.is_main:
        print(text, file=sys.stderr, flush=True)


def _bar(trainer, total: int, initial: int):
    mode = "off" if trainer.quiet else trainer.config.run.progress
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "lines"
    if mode != "bar" or not trainer.dist.is_main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {trainer.epoch}/{trainer.config.run.epochs}",
                leave=False, dynamic_ncols=True, file=sys.stderr)


def _out_of_steps(trainer) -> bool:
    max_steps = trainer.config.run.max_steps
    return bool(max_steps and trainer.step >= max_steps)


def _done(trainer) -> bool:
    return trainer.epoch >= trainer.config.run.epochs or _out_of_steps(trainer)


def _save_last(trainer) -> None:
    """``last.pt`` (every rank gathers a sharded student; rank 0 writes)."""
    if trainer.out is None:
        return
    state = trainer.state_dict()
    if trainer.dist.is_main:
        atomic_torch_save(state, trainer.out / "checkpoints" / "last.pt")
    trainer.dist.barrier()


def _resume(trainer, state: dict[str, Any] | None) -> None:
    """Continue from ``state`` (``last.pt`` as already read and checked), else read and check it."""
    last = trainer.out / "checkpoints" / "last.pt" if trainer.out is not None else None
    if state is None:
        if last is None or not last.exists():
            raise ConfigError(f"--resume: no checkpoint to resume from at {last}")
        state = load_checkpoint(last)
        check_resume(state, trainer.config, trainer.student, trainer.objective, path=last)
    if state.get("config") != cfg.dumps(trainer.config):
        _say(trainer, "kdcore: note: the configuration differs from the checkpoint's; resuming anyway")
    trainer.load_state_dict(state)
    where = f", batch {trainer.batch_in_epoch} of epoch {trainer.epoch + 1}" if trainer.batch_in_epoch else ""
    _say(trainer, f"resuming from {last} (epoch {trainer.epoch}, step {trainer.step}{where})")


def fit(trainer, resume: bool = False, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train to the end; returns the summary written to ``summary.json``.
    ``state``: the checkpoint to resume from, where the caller has read it."""
    main, out = trainer.dist.is_main, trainer.out
    metrics = JsonLines(out / "metrics.jsonl") if out is not None else None
    steps_log = JsonLines(out / "steps.jsonl") if out is not None else None
    if resume:
        _resume(trainer, state)
    if trainer.term_params:
        _say(trainer, f"loss terms add {trainer.term_parameter_count:,} trainable parameters")
    if main and out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.toml", cfg.dumps(trainer.config))
        if resume:  # an epoch resumed mid-way is evaluated again at its end
            metrics.truncate_after(trainer.step - 1 if trainer.batch_in_epoch else trainer.step)
            steps_log.truncate_after(trainer.step)
        else:
            for f in (metrics.path, steps_log.path):
                f.unlink(missing_ok=True)
    tb = Scalars(out / "tb", purge_step=trainer.step if resume else None) if main and out is not None else None
    started = time.perf_counter()
    last_record: dict[str, Any] = {}
    try:
        while not _done(trainer):
            trainer.epoch += 1
            record, complete = _run_epoch(trainer, metrics, steps_log, tb)
            last_record = record or last_record
            if complete:  # (a run stopped mid-epoch by max_steps saved its place already)
                _save_last(trainer)
        summary = _summary(trainer, last_record, time.perf_counter() - started)
        if main and out is not None:
            atomic_write(out / "summary.json", dumps_record(summary, indent=2) + "\n")
    finally:
        if tb is not None:
            tb.close()
    return summary


def _global_losses(trainer, losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """The step's term losses over all ranks: each rank's means weighted by its kept
    positions, which is what one process computes on the whole batch. One all-reduce,
    made only for a step that is logged (every rank calls it then)."""
    if not losses:
        return {}
    names = sorted(losses)  # the same order on every rank
    values = torch.stack([losses[k].detach().float() for k in names])
    if trainer.dist.enabled:
        kept = trainer.stepper.batch.kept().to(values.device).reshape(1)
        sums = trainer.dist.sum_(torch.cat([values * kept, kept]))
        values = sums[:-1] / sums[-1].clamp(min=1.0)
    reduced = dict(zip(names, values.tolist()))
    return {k: reduced[k] for k in losses}


def _trained_weights(trainer) -> dict[str, float]:
    """``weight/<term>`` of the optimizer step taken last: the weights that step trained
    with. (The next step's progress, ``trainer.progress()``, is past the run's last step
    at its end, ``fraction == 1``, outside the range schedules are documented for.)"""
    progress = attrs.evolve(trainer.progress(), step=max(trainer.step - 1, 0))
    return {f"weight/{k}": w for k, w in trainer.objective.weights(progress).items()}


def _run_epoch(trainer, metrics, steps_log, tb) -> tuple[dict[str, Any] | None, bool]:
    """One epoch (or its rest, after a mid-epoch resume); returns its evaluation record
    (None when not evaluated) and whether the epoch ran to its end (not stopped by
    ``run.max_steps``, which saves ``last.pt`` where it stopped, so that ``--resume``
    with more steps continues exactly)."""
    run, main = trainer.config.run, trainer.dist.is_main
    trainer.student.train()
    skip = trainer.batch_in_epoch
    meter = trainer.meter if skip and trainer.meter is not None else Meter()
    trainer.meter = meter
    aux = None
    if trainer.weighting is not None and trainer.weighting.needs_aux_batch:
        aux = AuxStream(trainer.batches, epoch_generator(run.seed, trainer.epoch, stream=1),
                        trainer.aux_consumed if skip else 0)
    bar = _bar(trainer, len(trainer.batches), skip)
    t0 = time.perf_counter()
    for batch in trainer.batches.epoch(epoch_generator(run.seed, trainer.epoch), skip=skip):
        with trainer.memory.around(trainer.step + 1):
            losses = trainer.train_step(batch, meter, aux)
        trainer.batch_in_epoch += 1
        trainer.aux_consumed = 0 if aux is None else aux.consumed
        if bar is not None:
            bar.update(1)
        if trainer.step % run.log_every == 0:
            trainer.guard.check()
            if steps_log is not None:  # set on every rank alike: all of them take part in the reduction
                losses = _global_losses(trainer, losses)
            if main and (tb is not None or steps_log is not None):
                rec = {"epoch": trainer.epoch, "step": trainer.step,
                       **{f"loss/{k}": float(v) for k, v in losses.items()},
                       **_trained_weights(trainer)}
                if tb is not None:
                    tb.add({f"step/{k}": v for k, v in rec.items() if k not in ("epoch", "step")}, trainer.step)
                if steps_log is not None:
                    steps_log.append(rec)
        if _out_of_steps(trainer):
            break
        if run.checkpoint_every and trainer.step % run.checkpoint_every == 0 \
                and trainer.batch_in_epoch < len(trainer.batches):
            _save_last(trainer)
    trainer.guard.check()
    complete = trainer.batch_in_epoch >= len(trainer.batches)
    if not complete:  # stopped by max_steps: save the place before the evaluation
        _save_last(trainer)
    trainer.batch_in_epoch, trainer.aux_consumed, trainer.meter = 0, 0, None
    if bar is not None:
        bar.close()
    means = meter.means(trainer.dist.mean)  # every rank takes part in the reduction
    if trainer.epoch % run.eval_every and not _done(trainer):
        return None, complete
    record: dict[str, Any] = {"epoch": trainer.epoch, "step": trainer.step, **means,
                              **_trained_weights(trainer),
                              "lr": trainer.optimizer.param_groups[0]["lr"]}
    record.update(trainer.evaluate(trainer.data.val, "val"))
    record["epoch_time_s"] = round(time.perf_counter() - t0, 4)
    if trainer.best.improves(record, trainer.epoch):
        trainer.best_val_acc = record.get("val_acc")
        if trainer.out is not None:
            best = {"model": trainer.student_state(), "losses": trainer.objective.modules.state_dict(),
                    "epoch": trainer.epoch, "step": trainer.step, "val_acc": trainer.best_val_acc,
                    "metric": trainer.best.name, "value": trainer.best.value}
            if main:
                atomic_torch_save(best, trainer.out / "checkpoints" / "best.pt")
    if main:
        if metrics is not None:
            metrics.append(record)
        if tb is not None:
            tb.add({f"epoch/{k}": v for k, v in record.items() if k not in ("epoch", "step")}, trainer.step)
        shown = "  ".join(f"{k.removeprefix('loss/')} {v:.4f}" for k, v in record.items()
                          if k.startswith("loss/") or k.startswith("val_"))
        _say(trainer, f"epoch {trainer.epoch}/{run.epochs}  {shown}  ({record['epoch_time_s']:.1f}s)")
    return record, complete


def _summary(trainer, last_record, elapsed) -> dict[str, Any]:
    """Final and best metrics; the student and the teacher(s) are evaluated on the test
    split, or on the validation split where there is no test split (``report_split``)."""
    summary: dict[str, Any] = {"epochs": trainer.epoch, "steps": trainer.step, "best_val_acc": trainer.best_val_acc,
                               **trainer.best.state_dict()}
    data = trainer.data
    report, split = ("test", data.test) if data.test is not None else ("val", data.val)
    summary["report_split"] = report if split is not None else None
    if split is not None:
        summary.update(_evaluations(trainer, split, report))
    if trainer.term_params:
        summary["loss_term_parameters"] = trainer.term_parameter_count
    if trainer.memory.enabled:
        summary["peak_step_mib"] = trainer.memory.peak_mib
    summary["final"] = last_record
    summary["train_time_s"] = round(elapsed, 3)
    return summary


def _evaluations(trainer, split, report: str) -> dict[str, Any]:
    """The student's metrics on ``split`` and each teacher's (kept across runs by
    :mod:`kdcore.engine.teacher_eval`), with the student's top-1 agreement with each:
    one teacher gives the keys ``{report}_agreement`` and ``teacher_{report}_acc``, ...;
    several a table ``teachers`` with, by name, ``{report}_acc``, ... and
    ``{report}_agreement`` (the student's agreement with that teacher)."""
    teachers = teacher_eval.evaluate_teachers(trainer, split, report)
    agreement = {name: f"{report}_agreement/{name}" for name in teachers}
    if trainer.config.teachers is None:
        agreement = {name: f"{report}_agreement" for name in teachers}
    out = trainer.evaluate(split, report, references={agreement[n]: top1 for n, (_, top1) in teachers.items()})
    if trainer.config.teachers is None:
        return {**out, **{f"teacher_{k}": v for metrics, _ in teachers.values() for k, v in metrics.items()}}
    out["teachers"] = {n: {**metrics, f"{report}_agreement": out.pop(agreement[n])}
                       for n, (metrics, _) in teachers.items()}
    return out


def summary_line(summary: dict[str, Any]) -> str:
    """The run's last line, on the split the summary reports: for token-level data
    (language models) the student's NLL and perplexity, otherwise its accuracy, with
    the distance to the truth where the data know it (KL for token-level data, total
    variation otherwise), next to the teacher's; then the best validation metric."""
    split = summary.get("report_split")
    if split is None:
        return "done: no test or validation split to evaluate on"
    parts = []
    named = [(f"teacher {n}", "", t) for n, t in (summary.get("teachers") or {}).items()]
    for who, prefix, table in (("student", "", summary), ("teacher", "teacher_", summary), *named):
        m = {k.removeprefix(f"{prefix}{split}_"): v for k, v in table.items() if k.startswith(f"{prefix}{split}_")}
        if m.get("ppl") is not None:
            parts.append(f"{who} {split}_nll {m['nll']:.4f} (ppl {m['ppl']:.2f}"
                         + ("" if m.get("kl") is None else f", kl to the truth {m['kl']:.4f}") + ")")
        elif m.get("acc") is not None:
            parts.append(f"{who} {split}_acc {m['acc']:.4f}"
                         + ("" if m.get("tv") is None else f" (tv to the truth {m['tv']:.4f})"))
    note = "" if split == "test" else " (no test split: validation split)"
    line = "done: " + ", ".join(parts) + note
    if summary.get("best_value") is not None:
        line += f"; best {summary['best_metric']} {summary['best_value']:.4f} (epoch {summary['best_epoch']})"
    return line
