"""The run configuration's sections as attrs classes: keys, types, defaults and
checks of every fixed section (``[run]``, ``[optim]``, ...), and the limits
every config obeys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from kdcore.common.errors import ConfigError

MAX_FILE_BYTES = 16 * 2**20
MAX_DEPTH = 32
MAX_LIST = 10_000
MAX_INT = 2**31 - 1
MAX_SEED = 2**63 - 1

#: Parameter names of ``[data]``, ``[teacher]`` and ``[student]`` that hold paths:
#: made absolute on load, so the run directory's config.toml runs from anywhere.
PATH_KEYS = frozenset({"path", "root", "dir", "file", "store", "checkpoint", "tokenizer"})
PATH_SUFFIXES = ("_path", "_dir", "_file", "_root")

#: the name of the one teacher of a ``[teacher]`` table (a term may say ``teacher = "teacher"``)
ONE_TEACHER = "teacher"

_TYPES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}


def _check_type(path: str, value: Any, typ: type) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise ConfigError(f"{path}: must be {_TYPES[typ]}, got {value!r}")
    return value


def _field(typ: type, default: Any, check=None, choices: tuple[str, ...] | None = None, optional=False):
    return attrs.field(default=default, metadata={"type": typ, "check": check, "choices": choices,
                                                  "optional": optional})


def _positive(v):
    """> 0"""
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    """>= 0"""
    return None if v >= 0 else "must be >= 0"


@attrs.define
class RunConfig:
    """How the run trains: epochs, batches, device, precision, logging, long-run controls."""

    seed: int = _field(int, 0)  # everything random derives from it
    epochs: int = _field(int, 20, _positive)  # passes over the training split
    batch_size: int = _field(int, 64, _positive)  # the global batch (split over DDP ranks)
    eval_batch_size: int = _field(int, 1024, _positive)  # batch size of evaluation
    device: str = _field(str, "auto", choices=("auto", "cpu", "cuda"))  # auto: CUDA when available
    amp: str = _field(str, "off", choices=("off", "bf16", "fp16"))  # mixed precision; fp16 on CUDA only
    channels_last: bool = _field(bool, False)  # memory format for image models
    compile: bool = _field(bool, False)  # torch.compile the student and the teacher
    num_workers: int = _field(int, 0, _non_negative)  # DataLoader workers
    threads: int = _field(int, 0, _non_negative)  # CPU threads for torch (0: torch's default)
    malloc: str = _field(str, "reuse", choices=("reuse", "system"))  # reuse: glibc keeps freed memory for the next step
    eval_every: int = _field(int, 1, _positive)  # epochs between evaluations (the last always evaluates)
    log_every: int = _field(int, 50, _positive)  # steps between step-level logs
    deterministic: bool = _field(bool, True)  # deterministic algorithms (warn only); false turns on cuDNN autotuning
    progress: str = _field(str, "auto", choices=("auto", "bar", "lines", "off"))  # auto: a bar on a terminal
    accumulate: int = _field(int, 1, _positive)       # micro-batches per optimizer step
    max_steps: int = _field(int, 0, _non_negative)    # > 0: stop after this many optimizer steps
    checkpoint_every: int = _field(int, 0, _non_negative)  # > 0: also write last.pt every N steps
    strategy: str = _field(str, "ddp", choices=("ddp", "fsdp"))  # how the student is wrapped under torchrun
    dist_timeout_s: float = _field(float, 300.0, _positive)  # under torchrun: longest wait for the other ranks
    measure_memory: bool = _field(bool, False)  # summary.json gets peak_step_mib: the peak memory of step 2
    evaluate_teacher: bool = _field(bool, True)  # the summary evaluates each teacher (kept in the teacher-eval cache)
    best_metric: str = _field(str, "auto")  # what best.pt keeps (auto: val_nll for token-level data, else val_acc)


@attrs.define
class OptimConfig:
    """The optimizer and its learning-rate schedule."""

    name: str = _field(str, "sgd", choices=("sgd", "adamw"))  # the optimizer
    lr: float = _field(float, 0.05, _positive)  # learning rate
    momentum: float = _field(float, 0.9, lambda v: None if 0 <= v < 1 else "must be in [0, 1)")  # sgd; in [0, 1)
    nesterov: bool = _field(bool, False)  # sgd: Nesterov momentum
    weight_decay: float = _field(float, 5e-4, _non_negative)  # L2 (sgd) or decoupled (adamw) decay
    betas: list = _field(list, attrs.Factory(lambda: [0.9, 0.999]))  # adamw; two numbers in [0, 1)
    lr_schedule: str = _field(str, "constant", choices=("constant", "step", "cosine"))  # per epoch
    milestones: list = _field(list, attrs.Factory(list))  # step: lr *= gamma after each of these epochs
    gamma: float = _field(float, 0.1, _positive)  # step: the factor
    min_lr: float = _field(float, 0.0, _non_negative)  # cosine: the floor
    warmup_steps: int = _field(int, 0, _non_negative)   # linear learning-rate warm-up (steps)
    clip_grad_norm: float = _field(float, 0.0, _non_negative)  # > 0: clip the global gradient norm


@attrs.define
class ComponentConfig:
    """A table naming a component; ``params`` are its other keys."""

    name: str  # a registered component name (or python:MODULE:ATTRIBUTE)
    params: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class SignalsConfig:
    """Where the teacher's outputs come from (``[teacher]`` keys, docs/signals.md)."""

    source: str = _field(str, "model", choices=("model", "store"))  # run the teacher, or read a store
    store: str | None = _field(str, None)  # source = "store": the directory `kdcore capture` wrote
    cache: bool = _field(bool, False)  # keep the teacher's outputs after the first epoch
    cache_budget_mb: int = _field(int, 1024, _positive)  # cache: most MiB kept on the device, the rest on disk
    fixed_view: bool = _field(bool, False)  # store/cache with random augmentation: one view per sample


#: the keys of :class:`SignalsConfig` in a ``[teacher]`` table
SIGNAL_KEYS = tuple(f.name for f in attrs.fields(SignalsConfig))


@attrs.define
class ModelConfig:
    """A model table: the backbone, its checkpoint and its parameters."""

    backbone: str | None  # a registered backbone name (or python:MODULE:ATTRIBUTE); None: a stored teacher
    checkpoint: str | None = None  # weights to load (a teacher without one must load its own)
    params: dict[str, Any] = attrs.field(factory=dict)
    signals: SignalsConfig = attrs.field(factory=SignalsConfig)  # the teacher's source ([teacher] only)


@attrs.define
class LossTermConfig:
    """One term ``w_i(t) * L_i`` of the objective."""

    name: str  # a registered loss name
    weight: float = 1.0  # w_i, multiplied by the schedule's value
    schedule: Any = None     # a scheduler name or {"name": ..., **params}
    id: str | None = None    # label in logs; default: the name (suffixed if repeated)
    params: dict[str, Any] = attrs.field(factory=dict)
    rows: str = "labelled"   # "all": also the unlabelled rows (target -100) of a transfer set
    teacher: str | list[str] | None = None  # with [teachers.NAME]: the teacher's name, or a list (an ensemble)
    ensemble: str = "probs"  # an ensemble's reduction: "probs" (mean of probabilities) or "logits"
    teacher_weights: list[float] | None = None  # an ensemble's weights (non-negative; normalised)


@attrs.define
class Config:
    """A whole run: one attribute per section of the TOML file."""

    run: RunConfig  # epochs, batches, device, precision, logging
    data: ComponentConfig  # the dataset and its parameters
    student: ModelConfig  # the model trained
    optim: OptimConfig  # optimizer and learning-rate schedule
    loss: list[LossTermConfig]  # the terms of the objective, one table each
    teacher: ModelConfig | None = None  # omit to train a teacher (a plain supervised run)
    teachers: dict[str, ModelConfig] | None = None  # [teachers.NAME]: several teachers, by name
    weighting: ComponentConfig | None = None  # a gradient-aware scheduler over the terms
    batch_policy: ComponentConfig | None = None  # replaces each step's batch (kdcore.losses.policy)
    source: Path | None = attrs.field(default=None, eq=False)

    def teacher_tables(self) -> dict[str, ModelConfig]:
        """The run's teachers by name: ``{"teacher": ...}`` for the one-teacher form
        ``[teacher]``, the ``[teachers.NAME]`` tables otherwise, ``{}`` without a teacher."""
        if self.teachers is not None:
            return dict(self.teachers)
        return {} if self.teacher is None else {ONE_TEACHER: self.teacher}

    def teacher_path(self, name: str) -> str:
        """The key path of teacher ``name``'s table: ``teacher`` or ``teachers.NAME``."""
        return "teacher" if self.teachers is None else f"teachers.{name}"

    def term_ids(self) -> list[str]:
        """Unique labels of the loss terms, in order: ``id`` or the name,
        numbered (``kd_1``, ``kd_2``) where a name repeats."""
        bases = [t.id or t.name for t in self.loss]
        seen: dict[str, int] = {}
        out = []
        for b in bases:
            if bases.count(b) > 1:
                seen[b] = seen.get(b, 0) + 1
                out.append(f"{b}_{seen[b]}")
            else:
                out.append(b)
        return out


