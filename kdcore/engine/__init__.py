"""The training engine: ``train`` (the Python API behind ``kdcore train``) and :class:`Trainer`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kdcore import config as cfg
from kdcore.engine.models import check_resume, load_checkpoint
from kdcore.engine.rundir import RunDir, check_out
from kdcore.engine.trainer import Trainer
from kdcore.plugins import default_registry
from kdcore.registry import Registry


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
                check_resume(state, trainer.config, trainer.student, path=run_dir.last)
            return trainer.fit(resume=resume, state=state)
    finally:
        from kdcore.engine import distributed

        distributed.teardown(trainer.dist)


__all__ = ["Trainer", "build_trainer", "train"]
