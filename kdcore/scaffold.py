"""``kdcore new-plugin NAME --kind KIND --out DIR``: a ready plugin package.

Writes ``DIR/kdcore-NAME/`` with a ``pyproject.toml`` (entry point
``NAME = "kdcore_NAME"`` in group ``kdcore``), the package ``kdcore_NAME``
(one sample component of ``KIND``, written against kdcore's public API, and
the ``@kdcore.hookimpl`` that registers it), a README and tests that pass
once the package is installed (``pip install -e ".[test]"; pytest``). An
existing directory is never written into: the package is built in a
temporary directory next to it and renamed into place.
"""

from __future__ import annotations

import keyword
import os
import re
import shutil
import tempfile
from pathlib import Path

from kdcore import __version__
from kdcore.errors import ConfigError
from kdcore.scaffold_templates import DISCOVERY_TEST, KINDS, PYPROJECT, README

#: a plugin name: lowercase letters and digits, words joined by "-" or "_", starting with a letter
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")


def check_name(name: str) -> str:
    """The component and entry-point name for ``name`` ("-" becomes "_"), or a
    :class:`ConfigError` naming the rule."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or len(name) > 40:
        raise ConfigError(f"NAME: {name!r} is not a plugin name (lowercase letters and digits, words joined by "
                          "'-' or '_', starting with a letter, at most 40 characters; e.g. 'my-loss')")
    ident = name.replace("-", "_")
    if keyword.iskeyword(ident):
        raise ConfigError(f"NAME: {name!r} is a Python keyword")
    return ident


def _camel(ident: str) -> str:
    return "".join(part.capitalize() for part in ident.split("_"))


def render(name: str, kind: str) -> dict[str, str]:
    """The package's files (relative path -> text) for plugin ``name`` of ``kind``."""
    ident = check_name(name)
    if kind not in KINDS:
        raise ConfigError(f"--kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    hook, sample, source, kind_test = KINDS[kind]
    module, dist = f"kdcore_{ident}", f"kdcore-{ident.replace('_', '-')}"
    tokens = {"__CAMEL__": _camel(ident), "__DIST__": dist, "__MODULE__": module, "__KIND__": kind,
              "__HOOK__": hook, "__KDCORE__": __version__}
    tokens["__CLASS__"] = sample.replace("__CAMEL__", tokens["__CAMEL__"])

    def fill(text: str) -> str:
        text = text.replace("__CLASS__", tokens["__CLASS__"])
        for token, value in tokens.items():
            text = text.replace(token, value)
        return text.replace("__NAME__", ident)

    return {"pyproject.toml": fill(PYPROJECT), "README.md": fill(README),
            f"{module}/__init__.py": fill(source), "tests/test_discovery.py": fill(DISCOVERY_TEST),
            f"tests/test_{ident}.py": fill(kind_test)}


def _check_free(ident: str, kind: str) -> None:
    """Refuse a name the installed plugins already use: the new plugin would fail to load."""
    import importlib.metadata as md

    from kdcore.plugins import ENTRY_POINT_GROUP, default_registry

    registry = default_registry()
    if ident in registry.available(kind):
        owner = registry.get(kind, ident).plugin
        raise ConfigError(f"NAME: {kind} {ident!r} is registered already (by plugin {owner!r}); "
                          "choose another NAME")
    if ident == "builtin" or ident in {ep.name for ep in md.entry_points(group=ENTRY_POINT_GROUP)}:
        raise ConfigError(f"NAME: an installed plugin is named {ident!r} already; choose another NAME")


def new_plugin(name: str, kind: str = "loss", out: str | os.PathLike = ".") -> Path:
    """Write plugin ``name`` of ``kind`` into ``out/kdcore-NAME`` and return that path.

    :class:`ConfigError` for a bad name or kind, a name the installed plugins
    use already (for a component of ``kind`` or as a plugin), a missing
    ``out`` or an existing target.
    """
    files = render(name, kind)
    _check_free(check_name(name), kind)
    parent = Path(out)
    if not parent.is_dir():
        raise ConfigError(f"--out: {parent} is not a directory")
    target = parent / f"kdcore-{check_name(name).replace('_', '-')}"
    if target.exists():
        raise ConfigError(f"{target} exists already (nothing was written): choose another NAME or --out")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the package is an ordinary directory
    try:
        for rel, text in files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        try:
            staging.rename(target)  # refuses an existing non-empty directory: never overwrites
        except OSError:
            raise ConfigError(f"{target} exists already (nothing was written): choose another NAME or --out") \
                from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
