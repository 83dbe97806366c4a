"""The training engine: ``train`` (the Python API behind ``kdcore train``), :class:`Trainer`,
and what plugins and programs build from a config without a run: :func:`build_model`,
:func:`build_objective`, and for trainers other than kdcore's, :func:`average_gradients`
(the loss terms' gradients over processes).

The engine's modules, each one concern (docs/architecture.md): ``runtime`` (the
process: ranks, device, numerics), ``models`` (data and models), ``objective``
(the loss terms and their weighting), ``teacher_source`` (model, cache or store),
``batches``, ``taps``, ``forward``, ``step`` (one optimizer step), ``gradients``,
``teachers`` (which teacher each term uses), ``teacher_cache``,
``optim``, ``evaluate``, ``teacher_eval`` (the teachers' evaluation, kept across runs), ``best``,
``loop`` (epochs, logging, the summary), ``checkpoints``,
``checkpoint_file`` (reading a checkpoint file safely), ``rundir`` (the run's directory
and lock), ``logs`` (``metrics.jsonl``, ``steps.jsonl``, TensorBoard), ``distributed``,
``capture`` and ``capture_resume`` (``kdcore capture``), ``meter``, ``memory`` and ``allocator``.

Layer 4: imports every layer below (common, plugins, losses, data, signals, config); never the CLI.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kdcore import config as cfg
from kdcore.engine.checkpoints import check_resume, load_checkpoint
from kdcore.engine.gradients import average_gradients
from kdcore.engine.models import build_model
from kdcore.engine.objective import Objective
from kdcore.engine.rundir import RunDir, check_out
from kdcore.engine.trainer import Trainer
from kdcore.plugins import default_registry
from kdcore.plugins.registry import Registry


def build_trainer(config: str | Path | Mapping[str, Any] | cfg.Config, out_dir: str | Path | None = None,
                  overrides: Iterable[str] = (), *, quiet: bool = False,
                  registry: Registry | None = None) -> Trainer:
    """A :class:`Trainer` from a config file path, a TOML-shaped mapping or a Config."""
    registry = registry or default_registry()
    if isinstance(config, cfg.Config):
        conf = config
    elif isinstance(config, Mapping):
        import copy

        conf = cfg.from_dict(cfg.apply_overrides(copy.deepcopy(dict(config)), overrides))
    else:
        conf = cfg.load(config, overrides)
    if conf.source is not None:  # python:MODULE:ATTRIBUTE components live beside the config first
        registry = registry.searching(str(Path(conf.source).resolve().parent))
    cfg.check_components(conf, registry)
    return Trainer(conf, out_dir, registry, quiet=quiet)


def build_objective(losses: Sequence[str | Mapping[str, Any]], registry: Registry | None = None) -> Objective:
    """The :class:`~kdcore.engine.objective.Objective` (``sum_i w_i(t) L_i``) of ``[[loss]]``
    tables (or loss names), validated like a config file's: unknown keys and parameters are
    :class:`kdcore.ConfigError` naming ``loss[i]``. For trainers other than kdcore's
    (``kdcore_lm.KDTrainer``)."""
    if isinstance(losses, (str, Mapping)):
        losses = [losses]
    tables = [{"name": t} if isinstance(t, str) else dict(t) for t in losses]
    # the loss section of a config (data, student and teacher are placeholders, never built)
    conf = cfg.from_dict({"data": {"name": "-"}, "student": {"backbone": "-"}, "teacher": {"backbone": "-"},
                          "loss": tables})
    return Objective.from_config(conf, registry or default_registry())


def default_out_dir(config: Any) -> Path:
    stem = Path(config).stem if isinstance(config, (str, Path)) else "run"
    return Path("runs") / stem


def train(config: str | Path | Mapping[str, Any] | cfg.Config, out_dir: str | Path | None = None,
          overrides: Iterable[str] = (), *, resume: bool = False, overwrite: bool = False,
          quiet: bool = False, registry: Registry | None = None) -> dict[str, Any]:
    """Run a training job and return its summary (also written to ``summary.json``).

    ``out_dir`` defaults to ``runs/<config file stem>``. It is locked while the
    run lasts; a new run into one that holds an earlier run is refused unless
    ``overwrite`` (which deletes that run's files); a resume is checked against
    the config before anything is written.
    """
    out_dir = check_out(default_out_dir(config) if out_dir is None else out_dir)
    trainer = build_trainer(config, out_dir, overrides, quiet=quiet, registry=registry)
    try:
        with RunDir.open(out_dir, resume=resume, overwrite=overwrite, main=trainer.dist.is_main) as run_dir:
            state = None
            if resume:
                state = load_checkpoint(run_dir.last)
                check_resume(state, trainer.config, trainer.student, trainer.objective, path=run_dir.last)
            return trainer.fit(resume=resume, state=state)
    finally:
        from kdcore.engine import distributed

        job, trainer = trainer.dist, None  # the DDP/FSDP model and its optimizer go before the group
        distributed.teardown(job)


__all__ = ["Trainer", "build_trainer", "train", "build_model", "build_objective", "Objective", "default_out_dir",
           "average_gradients"]
