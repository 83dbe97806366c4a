"""Run configuration: TOML -> attrs classes, ``--set`` overrides, validation.

Every error is a :class:`kdcore.ConfigError` whose message starts with the key
path (``loss[1].temperature: must be > 0``). Tables that name a component
(``[data]``, ``[teacher]``, ``[student]``, ``[[loss]]``, ``[weighting]``,
``[batch_policy]``) pass
their other keys to it as parameters; those are checked against the
component's signature by :func:`check_components`.

Limits against configs that would exhaust memory or the stack (all exit 2
naming the key path): a config file of at most 16 MiB, tables and lists
nested at most 32 deep, lists of at most 10,000 entries, integers within
+-(2**31 - 1) (sizes, counts, steps) except seeds (keys named ``seed``),
which are in 0 .. 2**63 - 1.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import tomli_w

from kdcore.errors import ConfigError, UnknownComponentError
from kdcore.registry import Registry, check_parameters

MAX_FILE_BYTES = 16 * 2**20
MAX_DEPTH = 32
MAX_LIST = 10_000
MAX_INT = 2**31 - 1
MAX_SEED = 2**63 - 1

#: Parameter names of ``[data]``, ``[teacher]`` and ``[student]`` that hold paths:
#: made absolute on load, so the run directory's config.toml runs from anywhere.
PATH_KEYS = frozenset({"path", "root", "dir", "file", "store", "checkpoint", "tokenizer"})
PATH_SUFFIXES = ("_path", "_dir", "_file", "_root")

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
    measure_memory: bool = _field(bool, False)  # summary.json gets peak_step_mib: the peak memory of step 2


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


@attrs.define
class Config:
    """A whole run: one attribute per section of the TOML file."""

    run: RunConfig  # epochs, batches, device, precision, logging
    data: ComponentConfig  # the dataset and its parameters
    student: ModelConfig  # the model trained
    optim: OptimConfig  # optimizer and learning-rate schedule
    loss: list[LossTermConfig]  # the terms of the objective, one table each
    teacher: ModelConfig | None = None  # omit to train a teacher (a plain supervised run)
    weighting: ComponentConfig | None = None  # a gradient-aware scheduler over the terms
    batch_policy: ComponentConfig | None = None  # replaces each step's batch (kdcore.policy)
    source: Path | None = attrs.field(default=None, eq=False)

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


_SECTIONS = ("run", "data", "teacher", "student", "optim", "loss", "weighting", "batch_policy")


def _table(path: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: must be a table, got {value!r}")
    return dict(value)


def _plain(cls: type, path: str, table: Mapping[str, Any] | None) -> Any:
    """Build a section of fixed keys, checking names, types and values."""
    table = _table(path, table or {})
    fields = {f.name: f for f in attrs.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{path}.{key}: unknown key (accepted: {', '.join(fields)})")
        meta, kp = fields[key].metadata, f"{path}.{key}"
        value = _check_type(kp, value, meta["type"])
        if meta["type"] is float and not math.isfinite(value):
            raise ConfigError(f"{kp}: must be finite, got {value!r}")
        if meta["choices"] and value not in meta["choices"]:
            raise ConfigError(f"{kp}: must be one of {', '.join(map(repr, meta['choices']))}, got {value!r}")
        problem = meta["check"](value) if meta["check"] else None
        if problem:
            raise ConfigError(f"{kp}: {problem}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def _component(path: str, table: Any, key: str = "name") -> ComponentConfig:
    table = _table(path, table)
    name = table.pop(key, None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}.{key}: required (a registered component name)")
    return ComponentConfig(name, table)


def _model(path: str, table: Any) -> ModelConfig:
    comp = _component(path, table, "backbone")
    ckpt = comp.params.pop("checkpoint", None)
    if ckpt is not None and not isinstance(ckpt, str):
        raise ConfigError(f"{path}.checkpoint: must be a path string, got {ckpt!r}")
    return ModelConfig(comp.name, ckpt, comp.params)


def _teacher(path: str, table: Any) -> ModelConfig:
    """``[teacher]``: a model table plus the keys of :class:`SignalsConfig`."""
    table = _table(path, table)
    signals = _plain(SignalsConfig, path, {k: table.pop(k) for k in SIGNAL_KEYS if k in table})
    if signals.source == "store":
        if not signals.store:
            raise ConfigError(f"{path}.store: required with source = 'store' (the directory `kdcore capture` wrote)")
        if signals.cache:
            raise ConfigError(f"{path}.cache: a stored teacher is read, not run; cache is for source = 'model'")
    elif signals.store is not None:
        raise ConfigError(f"{path}.store: only with source = 'store' (add source = \"store\")")
    if signals.source == "store" and "backbone" not in table:
        if table:  # no backbone: nothing else (the store says which teacher it holds)
            raise ConfigError(f"{path}.{next(iter(table))}: a stored teacher without a backbone takes no other keys")
        return ModelConfig(None, signals=signals)
    model = _model(path, table)
    model.signals = signals
    return model


def _loss_term(path: str, table: Any) -> LossTermConfig:
    comp = _component(path, table)
    p = comp.params
    weight = _check_type(f"{path}.weight", p.pop("weight", 1.0), float)
    if not math.isfinite(weight):
        raise ConfigError(f"{path}.weight: must be finite, got {weight!r}")
    schedule = p.pop("schedule", None)
    if schedule is not None and not isinstance(schedule, (str, Mapping)):
        raise ConfigError(f"{path}.schedule: must be a scheduler name or a table with 'name'")
    term_id = p.pop("id", None)
    if term_id is not None and (not isinstance(term_id, str) or not re.fullmatch(r"[\w.-]+", term_id)):
        raise ConfigError(f"{path}.id: must be a word (letters, digits, _ . -), got {term_id!r}")
    rows = p.pop("rows", "labelled")
    if rows not in ("labelled", "all"):
        raise ConfigError(f"{path}.rows: must be 'labelled' or 'all', got {rows!r}")
    return LossTermConfig(comp.name, weight, schedule, term_id, p, rows)


def _key_path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def check_limits(value: Any, path: str = "", depth: int = 0) -> None:
    """Refuse nesting, list lengths and integers beyond the documented limits (see the module doc)."""
    if depth > MAX_DEPTH:
        raise ConfigError(f"{path}: nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, Mapping):
        for key, item in value.items():
            check_limits(item, _key_path(path, key), depth + 1)
    elif isinstance(value, list):
        if len(value) > MAX_LIST:
            raise ConfigError(f"{path}: a list of {len(value):,} entries is longer than the limit of {MAX_LIST:,}")
        for i, item in enumerate(value):
            check_limits(item, _key_path(path, i), depth + 1)
    elif isinstance(value, int) and not isinstance(value, bool):
        if path.rsplit(".", 1)[-1] == "seed":
            if not 0 <= value <= MAX_SEED:
                raise ConfigError(f"{path}: must be in 0 .. 2**63 - 1, got {value}")
        elif abs(value) > MAX_INT:
            raise ConfigError(f"{path}: {value} is beyond the limit of +-(2**31 - 1) for sizes and counts")


def _is_path_key(key: str) -> bool:
    return key in PATH_KEYS or key.endswith(PATH_SUFFIXES)


def _absolute(value: str, source: Path | None) -> str:
    """An existing path made absolute: as given, else next to the config file; others unchanged."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return value
    for candidate in (p, source.parent / p if source is not None else None):
        if candidate is not None and candidate.exists():
            return str(candidate.resolve())
    return value


def resolve_paths(raw: dict[str, Any], source: Path | None) -> dict[str, Any]:
    """Make the existing paths in ``[data]``, ``[teacher]`` and ``[student]`` absolute (in place)."""
    for section in ("data", "teacher", "student"):
        table = raw.get(section)
        if not isinstance(table, dict):
            continue
        for key, value in table.items():
            if isinstance(value, str) and value and _is_path_key(key):
                table[key] = _absolute(value, source)
    return raw


def from_dict(raw: Mapping[str, Any], source: Path | None = None) -> Config:
    """Build and validate a :class:`Config` from a parsed TOML mapping."""
    raw = _table("config", raw)
    check_limits(raw)
    for key in raw:
        if key not in _SECTIONS:
            raise ConfigError(f"{key}: unknown section (sections: {', '.join(_SECTIONS)})")
    for key in ("data", "student", "loss"):
        if key not in raw:
            raise ConfigError(f"{key}: required section is missing")
    losses = raw["loss"]
    if isinstance(losses, Mapping):
        losses = [losses]
    if not isinstance(losses, list) or not losses:
        raise ConfigError("loss: must be one or more [[loss]] tables")
    config = Config(
        run=_plain(RunConfig, "run", raw.get("run")),
        data=_component("data", raw["data"]),
        student=_model("student", raw["student"]),
        optim=_plain(OptimConfig, "optim", raw.get("optim")),
        loss=[_loss_term(f"loss[{i}]", t) for i, t in enumerate(losses)],
        teacher=_teacher("teacher", raw["teacher"]) if "teacher" in raw else None,
        weighting=_component("weighting", raw["weighting"]) if "weighting" in raw else None,
        batch_policy=_component("batch_policy", raw["batch_policy"]) if "batch_policy" in raw else None,
        source=source,
    )
    seen_ids: set[str] = set()
    for i, t in enumerate(config.loss):
        if t.id in seen_ids:
            raise ConfigError(f"loss[{i}].id: {t.id!r} is used by more than one term")
        if t.id:
            seen_ids.add(t.id)
    for i, m in enumerate(config.optim.milestones):
        if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
            raise ConfigError(f"optim.milestones[{i}]: must be a positive integer epoch, got {m!r}")
    if len(config.optim.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1
                                               for b in config.optim.betas):
        raise ConfigError(f"optim.betas: must be two numbers in [0, 1), got {config.optim.betas!r}")
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """The resolved configuration as a TOML-ready mapping (defaults filled in)."""
    def model(m: ModelConfig) -> dict[str, Any]:
        d = {"backbone": m.backbone, **m.params}
        if m.checkpoint is not None:
            d["checkpoint"] = m.checkpoint
        defaults = SignalsConfig()
        d.update({k: v for k, v in attrs.asdict(m.signals).items() if v != getattr(defaults, k)})
        return d

    out: dict[str, Any] = {
        "run": attrs.asdict(config.run),
        "data": {"name": config.data.name, **config.data.params},
    }
    if config.teacher is not None:
        out["teacher"] = model(config.teacher)
    out["student"] = model(config.student)
    out["optim"] = attrs.asdict(config.optim)
    out["loss"] = []
    for t in config.loss:
        d = {"name": t.name, "weight": t.weight, **t.params}
        if t.schedule is not None:
            d["schedule"] = t.schedule
        if t.id is not None:
            d["id"] = t.id
        if t.rows != "labelled":
            d["rows"] = t.rows
        out["loss"].append(d)
    if config.weighting is not None:
        out["weighting"] = {"name": config.weighting.name, **config.weighting.params}
    if config.batch_policy is not None:
        out["batch_policy"] = {"name": config.batch_policy.name, **config.batch_policy.params}
    return _drop_none(out)


def _drop_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def dumps(config: Config) -> str:
    return tomli_w.dumps(to_dict(config))


_PATH = re.compile(r"^([A-Za-z_]\w*)(?:\[(\d+)\]|\.(\d+))?((?:\.[A-Za-z_][\w-]*)*)$")


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string
    except RecursionError:
        raise ConfigError(f"--set value {text[:40]!r}...: nested more than {MAX_DEPTH} levels deep") from None


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` (or ``loss[1].key=value``) overrides; values
    are TOML (``0.1``, ``[1, 2]``, ``{name = "ab"}``, ``"text"``) or bare strings."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        m = _PATH.match(key)
        if not sep or not m or not (m.group(4) or m.group(2) or m.group(3)):
            raise ConfigError(f"--set {item!r}: expected section.key=value (e.g. run.epochs=5, loss[1].temperature=2)")
        section, index = m.group(1), m.group(2) or m.group(3)
        keys = [k for k in m.group(4).split(".") if k]
        node: Any = raw.setdefault(section, {} if index is None else [])
        where = section
        if index is not None:
            if isinstance(node, Mapping):
                node = raw[section] = [node]
            i = int(index)
            if not isinstance(node, list) or i >= len(node):
                raise ConfigError(f"--set {key}: {section} has no entry [{i}]")
            node, where = node[i], f"{section}[{i}]"
        if not keys:
            raise ConfigError(f"--set {item!r}: name a key inside {where}")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {where}.{k} is not a table")
            where = f"{where}.{k}"
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {where} is not a table")
        node[keys[-1]] = _parse_value(text.strip())
    return raw


def load(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a TOML config file, apply overrides and validate its structure."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: config file of {path.stat().st_size:,} bytes is larger than "
                              f"the limit of {MAX_FILE_BYTES:,}")
        text = path.read_text(encoding="utf-8-sig")  # a UTF-8 byte-order mark is fine
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: tables or lists nested more than {MAX_DEPTH} levels deep") from None
    return from_dict(resolve_paths(apply_overrides(raw, overrides), path), source=path)


def check_components(config: Config, registry: Registry) -> None:
    """Check that every named component exists and accepts its parameters."""
    def check(kind: str, name: str, params: Mapping[str, Any], path: str, name_key: str = "name",
              reserved: tuple[str, ...] = ()) -> None:
        try:
            comp = registry.get(kind, name)
        except UnknownComponentError as exc:
            raise ConfigError(f"{path}.{name_key}: {exc}" if name_key else f"{path}: {exc}") from None
        try:
            check_parameters(comp, {k: v for k, v in params.items() if k not in reserved})
        except ConfigError as exc:
            raise exc.with_path(path) from None

    check("dataset", config.data.name, config.data.params, "data")
    for section in ("teacher", "student"):
        m = getattr(config, section)
        if m is not None and m.backbone is not None:
            check("backbone", m.backbone, m.params, section, "backbone", ("num_classes", "in_features"))
    def nested(kind: str, spec: Any, path: str) -> None:
        if isinstance(spec, str):
            check(kind, spec, {}, path, name_key="")
        elif isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
            check(kind, spec["name"], {k: v for k, v in spec.items() if k != "name"}, path)

    for i, term in enumerate(config.loss):
        check("loss", term.name, term.params, f"loss[{i}]")
        for key, value in term.params.items():  # the components a term names by convention
            if key == "divergence" or key.endswith("_divergence"):
                nested("divergence", value, f"loss[{i}].{key}")
            elif key == "transforms" and isinstance(value, list):
                for j, spec in enumerate(value):
                    nested("transform", spec, f"loss[{i}].transforms[{j}]")
        if isinstance(term.schedule, str):
            check("scheduler", term.schedule, {}, f"loss[{i}].schedule")
        elif isinstance(term.schedule, Mapping):
            sched = dict(term.schedule)
            name = sched.pop("name", None)
            if not isinstance(name, str):
                raise ConfigError(f"loss[{i}].schedule.name: required")
            check("scheduler", name, sched, f"loss[{i}].schedule")
    if config.weighting is not None:
        check("scheduler", config.weighting.name, config.weighting.params, "weighting")
    if config.batch_policy is not None:
        check("batch_policy", config.batch_policy.name, config.batch_policy.params, "batch_policy")
