"""``kdcore new-plugin NAME --kind KIND [--kind KIND ...] --out DIR``: a ready plugin package.

Writes ``DIR/kdcore-NAME/`` with a ``pyproject.toml`` (entry point
``NAME = "kdcore_NAME"`` in group ``kdcore``), the package ``kdcore_NAME``
(one sample component of each ``KIND``, written against kdcore's public API,
and the ``@kdcore.hookimpl`` that registers it), a README and tests that pass
once the package is installed (``pip install -e ".[test]"; pytest``).

The files are rendered from ``kdcore/cli/templates/*.tmpl`` (package data) with
:class:`string.Template`: ``${name}`` (the entry-point and component name),
``${dist}`` (``kdcore-NAME``), ``${module}`` (``kdcore_NAME``), ``${cls}`` (the
sample component), ``${camel}`` (the name in CamelCase), ``${kind}``,
``${hook}`` (the registration hook) and ``${kdcore}`` (the kdcore version the
package asks for at least) in a kind's two templates; the package's files
(README, pyproject, discovery tests) get the lists of all kinds instead:
``${kinds}`` (a Python list), ``${kind_list}``, ``${components}``,
``${list_commands}``, ``${hooks}``, ``${component_files}`` and ``${test_files}``.
A template writes ``$$`` for a dollar sign. An
existing directory is never written into: the package is built in a
temporary directory next to it and renamed into place.
"""

from __future__ import annotations

import keyword
import os
import re
import shutil
import string
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from kdcore.common.errors import ConfigError
from kdcore.common.version import VERSION

#: a plugin name: lowercase letters and digits, words joined by "-" or "_", starting with a letter
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")


#: kind -> (its registration hook, the sample component's name); templates ``KIND.py.tmpl`` and
#: ``test_KIND.py.tmpl`` hold the sample and its tests
KINDS = {
    "loss": ("register_losses", "${camel}Loss"),
    "divergence": ("register_divergences", "${camel}Divergence"),
    "transform": ("register_transforms", "${camel}Transform"),
    "scheduler": ("register_schedulers", "${camel}Schedule"),
    "backbone": ("register_backbones", "${camel}Net"),
    "dataset": ("register_datasets", "gaussian_blobs"),
}


def _template(name: str) -> string.Template:
    return string.Template(resources.files("kdcore.cli").joinpath("templates", f"{name}.tmpl").read_text("utf-8"))


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


def check_kinds(kinds: str | Sequence[str]) -> list[str]:
    """The kinds asked for, in order, each once (a :class:`ConfigError` for an unknown one)."""
    kinds = [kinds] if isinstance(kinds, str) else list(dict.fromkeys(kinds))
    for kind in kinds:
        if kind not in KINDS:
            raise ConfigError(f"--kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    if not kinds:
        raise ConfigError(f"--kind: name at least one of {', '.join(KINDS)}")
    return kinds


def render(name: str, kinds: str | Sequence[str] = "loss") -> dict[str, str]:
    """The package's files (relative path -> text) for plugin ``name`` with one sample
    component of each of ``kinds`` (one kind or several, all registered as ``name``).

    One kind: the component is the package's ``__init__.py``, its tests
    ``tests/test_NAME.py``. Several: each is the module ``KIND.py`` of the package,
    whose ``__init__.py`` imports their hooks, with tests ``tests/test_NAME_KIND.py``."""
    ident = check_name(name)
    kinds = check_kinds(kinds)
    module, dist = f"kdcore_{ident}", f"kdcore-{ident.replace('_', '-')}"
    base = {"name": ident, "camel": _camel(ident), "dist": dist, "module": module, "kdcore": VERSION}
    per_kind = {kind: {**base, "kind": kind, "hook": KINDS[kind][0],
                       "cls": string.Template(KINDS[kind][1]).substitute(base)} for kind in kinds}
    single = len(kinds) == 1
    fields = _package_fields(base, per_kind)
    files = {"pyproject.toml": _template("pyproject.toml").substitute(fields),
             "README.md": _template("README.md").substitute(fields),
             "tests/test_discovery.py": _template("test_discovery.py").substitute(fields)}
    for kind in kinds:
        code, test = (f"{module}/__init__.py", f"tests/test_{ident}.py") if single else \
            (f"{module}/{kind}.py", f"tests/test_{ident}_{kind}.py")
        files[code] = _template(f"{kind}.py").substitute(per_kind[kind])
        files[test] = _template(f"test_{kind}.py").substitute(per_kind[kind])
    if not single:
        files[f"{module}/__init__.py"] = _package_init(dist, module, kinds)
    return files


def _package_fields(base: dict[str, str], per_kind: dict[str, dict[str, str]]) -> dict[str, str]:
    """The fields of the package's own files (README, pyproject, discovery tests): ``base``
    and the lists of every kind's component, module, hook and test file."""
    kinds, ident, module = list(per_kind), base["name"], base["module"]
    single = len(kinds) == 1
    where = {k: module if single else f"{module}.{k}" for k in kinds}
    return {**base, "kinds": _py_list(kinds), "kind_list": _and(kinds),
            "components": _and([f"the {k} `{ident}` (`{where[k]}.{per_kind[k]['cls']}`)" for k in kinds]),
            "list_commands": _and([f"`kdcore list {k}`" for k in kinds]),
            "hooks": _and([f"`{per_kind[k]['hook']}`" for k in kinds]),
            "component_files": "".join(f"- `{where[k].replace('.', '/')}{'/__init__' if single else ''}.py`: "
                                       f"the {k} and the `@kdcore.hookimpl` that registers it;\n" for k in kinds),
            "test_files": ";\n".join(f"- `tests/test_{ident}{'' if single else '_' + k}.py`: the {k} against "
                                     "a float64 reference" for k in kinds) + ".\n"}


def _py_list(items: Sequence[str]) -> str:
    """``items`` as a Python list of double-quoted strings, as the generated code writes them."""
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def _and(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _package_init(dist: str, module: str, kinds: Sequence[str]) -> str:
    """The ``__init__.py`` of a package with several kinds: it imports each module's
    hook, so that kdcore, loading the entry point ``module``, finds them all."""
    hooks = [KINDS[kind][0] for kind in kinds]
    imports = "".join(f"from {module}.{kind} import {hook}\n" for kind, hook in zip(kinds, hooks))
    return (f'"""{dist}: registers its {_and(list(kinds))}, each from its own module."""\n\n'
            f"{imports}\n__all__ = {_py_list(hooks)}\n")


def _check_free(ident: str, kinds: Sequence[str]) -> None:
    """Refuse a name the installed plugins already use: the new plugin would fail to load."""
    import importlib.metadata as md

    from kdcore.plugins import ENTRY_POINT_GROUP, default_registry

    registry = default_registry()
    for kind in kinds:
        if ident in registry.available(kind):
            owner = registry.get(kind, ident).plugin
            raise ConfigError(f"NAME: {kind} {ident!r} is registered already (by plugin {owner!r}); "
                              "choose another NAME")
    if ident == "builtin" or ident in {ep.name for ep in md.entry_points(group=ENTRY_POINT_GROUP)}:
        raise ConfigError(f"NAME: an installed plugin is named {ident!r} already; choose another NAME")


def new_plugin(name: str, kind: str | Sequence[str] = "loss", out: str | os.PathLike = ".") -> Path:
    """Write plugin ``name`` with a component of ``kind`` (one kind or several) into
    ``out/kdcore-NAME`` and return that path.

    :class:`ConfigError` for a bad name or kind, a name the installed plugins
    use already (for a component of one of the kinds or as a plugin), a missing
    ``out`` or an existing target.
    """
    files = render(name, kind)
    _check_free(check_name(name), check_kinds(kind))
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
