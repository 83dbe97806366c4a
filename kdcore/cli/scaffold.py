"""``kdcore new-plugin NAME --kind KIND --out DIR``: a ready plugin package.

Writes ``DIR/kdcore-NAME/`` with a ``pyproject.toml`` (entry point
``NAME = "kdcore_NAME"`` in group ``kdcore``), the package ``kdcore_NAME``
(one sample component of ``KIND``, written against kdcore's public API, and
the ``@kdcore.hookimpl`` that registers it), a README and tests that pass
once the package is installed (``pip install -e ".[test]"; pytest``).

The files are rendered from ``kdcore/cli/templates/*.tmpl`` (package data) with
:class:`string.Template`: ``${name}`` (the entry-point and component name),
``${dist}`` (``kdcore-NAME``), ``${module}`` (``kdcore_NAME``), ``${cls}`` (the
sample component), ``${camel}`` (the name in CamelCase), ``${kind}``,
``${hook}`` (the registration hook) and ``${kdcore}`` (the kdcore version the
package asks for at least); a template writes ``$$`` for a dollar sign. An
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


def render(name: str, kind: str) -> dict[str, str]:
    """The package's files (relative path -> text) for plugin ``name`` of ``kind``."""
    ident = check_name(name)
    if kind not in KINDS:
        raise ConfigError(f"--kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    hook, sample = KINDS[kind]
    module, dist = f"kdcore_{ident}", f"kdcore-{ident.replace('_', '-')}"
    fields = {"name": ident, "camel": _camel(ident), "dist": dist, "module": module, "kind": kind, "hook": hook,
              "kdcore": VERSION}
    fields["cls"] = string.Template(sample).substitute(fields)
    files = {"pyproject.toml": "pyproject.toml", "README.md": "README.md", f"{module}/__init__.py": kind + ".py",
             "tests/test_discovery.py": "test_discovery.py", f"tests/test_{ident}.py": f"test_{kind}.py"}
    return {rel: _template(name).substitute(fields) for rel, name in files.items()}


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
