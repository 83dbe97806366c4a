"""A TOML-shaped mapping -> :class:`~kdcore.config.schema.Config` and back:
section tables, component tables, key-path errors, limits, paths made absolute.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import tomli_w

from kdcore.common.errors import ConfigError
from kdcore.config.schema import (ComponentConfig, Config, LossTermConfig, MAX_DEPTH, MAX_INT, MAX_LIST, MAX_SEED,
                                  ModelConfig, ONE_TEACHER, OptimConfig, PATH_KEYS, PATH_SUFFIXES, RunConfig,
                                  SIGNAL_KEYS, SignalsConfig, _check_type)

_SECTIONS = ("run", "data", "teacher", "teachers", "student", "optim", "loss", "weighting", "batch_policy")
#: a teacher's name in ``[teachers.NAME]``: it becomes part of key paths and summary keys
_TEACHER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENSEMBLES = ("probs", "logits")


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


def _teachers(table: Any) -> dict[str, ModelConfig]:
    """``[teachers.NAME]`` tables, each read as ``[teacher]``; NAME a simple identifier."""
    table = _table("teachers", table)
    if not table:
        raise ConfigError("teachers: add one [teachers.NAME] table per teacher (or use [teacher] for one)")
    for name in table:
        if not _TEACHER_NAME.fullmatch(name):
            raise ConfigError(f"teachers.{name}: a teacher's name must be a simple identifier "
                              "(letters, digits and _, not starting with a digit)")
    return {name: _teacher(f"teachers.{name}", t) for name, t in table.items()}


def _term_teacher(path: str, p: dict[str, Any]) -> tuple[str | list[str] | None, str, list[float] | None]:
    """A term's ``teacher`` (a name, or a list of names: an ensemble), ``ensemble`` and
    ``teacher_weights``, taken out of its parameters and checked for their form."""
    teacher = p.pop("teacher", None)
    ensemble = p.pop("ensemble", None)
    weights = p.pop("teacher_weights", None)
    if isinstance(teacher, list):
        if len(teacher) < 2 or not all(isinstance(n, str) for n in teacher) or len(set(teacher)) < len(teacher):
            raise ConfigError(f"{path}.teacher: an ensemble is a list of two or more different teacher names, "
                              f"got {teacher!r}")
    elif teacher is not None and not isinstance(teacher, str):
        raise ConfigError(f"{path}.teacher: must be a teacher's name or a list of names, got {teacher!r}")
    if not isinstance(teacher, list):
        for key, value in (("ensemble", ensemble), ("teacher_weights", weights)):
            if value is not None:
                raise ConfigError(f"{path}.{key}: only for an ensemble (teacher = [\"a\", \"b\"])")
        return teacher, "probs", None
    if ensemble is not None and ensemble not in _ENSEMBLES:
        raise ConfigError(f"{path}.ensemble: must be one of {', '.join(map(repr, _ENSEMBLES))}, got {ensemble!r}")
    if weights is not None:
        if not isinstance(weights, list) or len(weights) != len(teacher) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
                for w in weights) or not sum(weights) > 0:
            raise ConfigError(f"{path}.teacher_weights: must be {len(teacher)} non-negative numbers (one per "
                              f"teacher, not all 0), got {weights!r}")
        weights = [float(w) for w in weights]
    return teacher, ensemble or "probs", weights


def _check_term_teachers(config: Config) -> None:
    """Every teacher a term names exists (a did-you-mean otherwise)."""
    names = list(config.teacher_tables())
    for i, term in enumerate(config.loss):
        if term.teacher is None:
            continue
        if not names:
            raise ConfigError(f"loss[{i}].teacher: the config has no teacher (add [teachers.NAME] tables)")
        for name in [term.teacher] if isinstance(term.teacher, str) else term.teacher:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"; did you mean {close[0]!r}" if close else ""
                raise ConfigError(f"loss[{i}].teacher: unknown teacher {name!r}{hint} "
                                  f"(teachers: {', '.join(names)})")


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
    teacher, ensemble, teacher_weights = _term_teacher(path, p)
    return LossTermConfig(comp.name, weight, schedule, term_id, p, rows, teacher, ensemble, teacher_weights)


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


def resolve_path(path: str, config_source: Path | None) -> Path:
    """A path as given, or relative to the config file's folder if only that exists."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and config_source is not None:
        alt = config_source.parent / p
        if alt.exists():
            return alt
    return p


def resolve_paths(raw: dict[str, Any], source: Path | None) -> dict[str, Any]:
    """Make the existing paths in ``[data]``, ``[teacher]``, ``[teachers.NAME]`` and ``[student]``
    absolute (in place)."""
    teachers = raw.get("teachers")
    named = list(teachers.values()) if isinstance(teachers, dict) else []
    for table in [raw.get(section) for section in ("data", "teacher", "student")] + named:
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
    if "teacher" in raw and "teachers" in raw:
        raise ConfigError("teachers: a config has [teacher] (one teacher) or [teachers.NAME] tables, not both; "
                          f"move [teacher] to [teachers.NAME] (e.g. [teachers.{ONE_TEACHER}])")
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
        teachers=_teachers(raw["teachers"]) if "teachers" in raw else None,
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
    _check_term_teachers(config)
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
    if config.teachers is not None:
        out["teachers"] = {name: model(m) for name, m in config.teachers.items()}
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
        if t.teacher is not None:
            d["teacher"] = t.teacher
        if isinstance(t.teacher, list):
            d["ensemble"] = t.ensemble
        if t.teacher_weights is not None:
            d["teacher_weights"] = t.teacher_weights
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


