"""Reading a config file and applying ``--set`` overrides.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


from kdcore.common.errors import ConfigError
from kdcore.config.parse import from_dict, resolve_paths
from kdcore.config.schema import Config, MAX_DEPTH, MAX_FILE_BYTES, ONE_TEACHER

_PATH = re.compile(r"^([A-Za-z_]\w*)(?:\[(\d+)\]|\.(\d+))?((?:\.[A-Za-z_][\w-]*)*)$")


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string
    except RecursionError:
        raise ConfigError(f"--set value {text[:40]!r}...: nested more than {MAX_DEPTH} levels deep") from None


def _parse_table(item: str, text: str, where: str, tables: bool) -> Any:
    """The TOML value of ``--set item`` that replaces all of ``where``: a table, or with
    ``tables`` also an array of tables (``loss=[{...}, {...}]``). No bare-word fallback
    here: a typo in a whole section's value is reported, not taken as a string."""
    why = ""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as exc:
        value = None
        why = " (invalid TOML: " + re.sub(r"column (\d+)", lambda m: f"column {int(m[1]) - 4}", str(exc)) + ")"
    except RecursionError:
        raise ConfigError(f"--set {item[:40]!r}...: nested more than {MAX_DEPTH} levels deep") from None
    if isinstance(value, dict) or tables and isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return value
    wanted = "a table {key = value, ...}" + (" or an array of tables [{...}, ...]" if tables else "")
    raise ConfigError(f"--set {item!r}: {where} takes {wanted}{why}; set one key with {where}.KEY=VALUE")


def _select_teacher(raw: dict[str, Any], item: str, name: str) -> None:
    """``--set teacher=NAME`` on a config with ``[teachers.NAME]`` tables: the config of that
    teacher alone (``[teacher]`` holds its table, the terms name no teacher). On a config
    with ``[teacher]``, NAME is that teacher's name, ``teacher``."""
    teachers = raw.get("teachers")
    names = list(teachers) if isinstance(teachers, dict) else [ONE_TEACHER] if "teacher" in raw else []
    if teachers is None and name in names:
        return
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}" if close else ""
        raise ConfigError(f"--set {item!r}: unknown teacher {name!r}{hint} (teachers: {', '.join(names) or 'none'})")
    raw["teacher"] = raw.pop("teachers")[name]
    losses = raw.get("loss")
    for table in [losses] if isinstance(losses, dict) else losses if isinstance(losses, list) else []:
        if isinstance(table, dict):
            for key in ("teacher", "ensemble", "teacher_weights"):
                table.pop(key, None)


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` (or ``loss[1].key=value``) overrides; values
    are TOML (``0.1``, ``[1, 2]``, ``{name = "ab"}``, ``"text"``) or bare strings.
    ``section=VALUE`` replaces a whole section by a TOML table or, for an array of
    tables such as ``[[loss]]``, by an array of tables; ``loss[1]={...}`` replaces one entry.
    ``teacher=NAME`` keeps only teacher NAME of a config with ``[teachers.NAME]`` tables."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        m = _PATH.match(key)
        if not sep or not m:
            raise ConfigError(f"--set {item!r}: expected section.key=value (e.g. run.epochs=5, loss[1].temperature=2)")
        section, index = m.group(1), m.group(2) or m.group(3)
        keys = [k for k in m.group(4).split(".") if k]
        if index is None and not keys:
            if section == "teacher" and isinstance(_parse_value(text.strip()), str):
                _select_teacher(raw, item, _parse_value(text.strip()))
                continue
            raw[section] = _parse_table(item, text.strip(), section, tables=True)
            continue
        node: Any = raw.setdefault(section, {} if index is None else [])
        where = section
        if index is not None:
            if isinstance(node, Mapping):
                node = raw[section] = [node]
            i = int(index)
            if not isinstance(node, list) or i >= len(node):
                raise ConfigError(f"--set {key}: {section} has no entry [{i}]")
            if not keys:
                node[i] = _parse_table(item, text.strip(), f"{section}[{i}]", tables=False)
                continue
            node, where = node[i], f"{section}[{i}]"
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {where}.{k} is not a table")
            where = f"{where}.{k}"
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {where} is not a table")
        node[keys[-1]] = _parse_value(text.strip())
    return raw


def _read(path: Path) -> str:
    """The text of a config file, refused once more than :data:`MAX_FILE_BYTES` bytes
    arrive: counted on the bytes read, not on ``stat``, so that a FIFO, a process
    substitution or a device such as ``/dev/zero`` is bounded too."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: config file is larger than the limit of {MAX_FILE_BYTES:,} bytes")
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte-order mark is fine
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None


def load(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a TOML config file, apply overrides and validate its structure."""
    path = Path(path)
    text = _read(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: tables or lists nested more than {MAX_DEPTH} levels deep") from None
    return from_dict(resolve_paths(apply_overrides(raw, overrides), path), source=path)


