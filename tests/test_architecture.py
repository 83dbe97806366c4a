"""The package's architecture, checked from the source (docs/architecture.md).

Every ``import`` statement of kdcore/**/*.py is read with :mod:`ast` (nothing
is imported to find them): those inside functions and under ``if
TYPE_CHECKING`` count like the others. An import names one module:

- ``import kdcore.a.b`` names ``kdcore.a.b``;
- ``from kdcore.a import b`` names ``kdcore.a.b`` where that is a module (a
  file, a package, or an old module path served by
  :mod:`kdcore.common.aliases`), else ``kdcore.a``;
- relative imports are resolved first (in kdcore/config/check.py, ``from
  ..plugins import registry`` would name ``kdcore.plugins.registry``).

The checks:

- the module graph has no cycle;
- every import respects the layers (:data:`LAYERS`), and every package is in a layer;
- every package's ``__init__`` docstring names its layer;
- the plugins' own code imports only kdcore's public modules (:data:`PUBLIC`), no ``_`` names;
- kdcore 0.1's module paths (``kdcore.functional`` ...) still import and give the same objects;
- docs/architecture.md lists the same layers and the same public modules as this file.
"""

from __future__ import annotations

import ast
import functools
import importlib
import re
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kdcore"
DOC = ROOT / "docs" / "architecture.md"

#: top-level package of kdcore -> its layer. A module may import its own package and packages
#: of lower layers only. The package root (kdcore/__init__.py, kdcore/__main__.py) is above all
#: of them and may import anything.
LAYERS = {
    "common": 0,
    "plugins": 1,
    "losses": 2,
    "data": 2,
    "signals": 3,
    "config": 3,
    "builtin": 3,
    "engine": 4,
    "cli": 5,
    "testing": 5,
}

#: (importing package, imported package) pairs of the same layer that may import each other: none
SAME_LAYER_ALLOWED: frozenset[tuple[str, str]] = frozenset()

#: packages whose modules may import the package root ``kdcore`` (``import kdcore``, ``from kdcore
#: import hookimpl``); kdcore.testing would be the one, but it does not (only its docstring does)
ROOT_IMPORT_ALLOWED: frozenset[str] = frozenset()

#: the modules of kdcore that plugins may import (docs/architecture.md, "Public API for plugins")
PUBLIC = (
    "kdcore",
    "kdcore.common",
    "kdcore.common.errors",
    "kdcore.common.params",
    "kdcore.plugins",
    "kdcore.plugins.hookspecs",
    "kdcore.losses",
    "kdcore.losses.functional",
    "kdcore.losses.fused",
    "kdcore.losses.outputs",
    "kdcore.losses.divergences",
    "kdcore.losses.schedule",
    "kdcore.losses.weighting",
    "kdcore.losses.policy",
    "kdcore.data",
    "kdcore.signals",
    "kdcore.signals.store",
    "kdcore.config",
    "kdcore.engine",
    "kdcore.cli",
    "kdcore.cli.demo",
    "kdcore.testing",
)

#: old module path (kdcore 0.1) -> {a public name: the module that defines it now}
OLD_PATH_NAMES = {
    "errors": {"ConfigError": "kdcore.common.errors", "PluginError": "kdcore.common.errors"},
    "params": {"positive": "kdcore.common.params"},
    "hookspecs": {"hookimpl": "kdcore.plugins.hookspecs", "register_losses": "kdcore.plugins.hookspecs"},
    "functional": {"kl_rows": "kdcore.losses.functional", "is_kl": "kdcore.losses.divergences",
                   "KL": "kdcore.losses.divergences"},
    "fused": {"fused_kept_sum": "kdcore.losses.fused"},
    "outputs": {"Outputs": "kdcore.losses.outputs"},
    "schedule": {"Progress": "kdcore.losses.schedule", "TimeSchedule": "kdcore.losses.schedule"},
    "weighting": {"GradientWeighting": "kdcore.losses.weighting"},
    "policy": {"BatchPolicy": "kdcore.losses.policy"},
    "store": {"StoreReader": "kdcore.signals.store"},
    "capture": {"capture": "kdcore.engine.capture"},
    "demo": {"present": "kdcore.cli.demo"},
}

#: kdcore 0.1 modules that are packages now (no alias: the package re-exports the names)
OLD_PACKAGE_NAMES = {
    "losses": {"LogitLoss": "kdcore.losses.base", "Outputs": "kdcore.losses.outputs"},
    "data": {"DataSplits": "kdcore.data.splits"},
    "config": {"apply_overrides": "kdcore.config.load"},
    "plugins": {"create": "kdcore.plugins.loading", "Registry": "kdcore.plugins.registry"},
    "cli": {"main": "kdcore.cli.commands"},
}


# -- reading the source --------------------------------------------------------------------------


class Import(NamedTuple):
    target: str        # the module the statement names (resolved, see the module docstring)
    line: int
    name: str | None   # the name after ``import`` in ``from M import name``; None for ``import M``


def module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool, modules: frozenset[str]) -> list[Import]:
    """Every import statement of ``source`` (the module ``module``) that names a kdcore module.

    ``modules``: the module names ``from M import name`` may resolve ``M.name`` to.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, node.lineno, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise ValueError(f"{module}:{node.lineno}: relative import beyond the top-level package")
                base = ".".join(parts[:len(parts) - (node.level - 1)])
                source_module = f"{base}.{node.module}" if node.module else base
            else:
                source_module = node.module
            for alias in node.names:
                sub = f"{source_module}.{alias.name}"
                found.append(Import(sub if sub in modules else source_module, node.lineno, alias.name))
    return [i for i in found if i.target == "kdcore" or i.target.startswith("kdcore.")]


MODULES = {module_name(p, ROOT): p for p in sorted(PACKAGE.rglob("*.py"))}
PACKAGE_DIRS = sorted(p.parent for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE)
PLUGIN_DIRS = sorted(p for p in (ROOT / "plugins").iterdir() if any(p.glob("kdcore_*/__init__.py")))


@functools.cache
def old_paths() -> dict[str, list[str]]:
    """The table that kdcore/__init__.py passes to ``aliases.install``: old name -> new homes."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "install"
                and len(node.args) == 2):
            return ast.literal_eval(node.args[1])
    raise AssertionError("kdcore/__init__.py calls no aliases.install(__name__, {...})")


@functools.cache
def known() -> frozenset[str]:
    """What ``from M import name`` may resolve ``M.name`` to: the modules and the old module paths."""
    return frozenset(MODULES) | {f"kdcore.{old}" for old in old_paths()}


@functools.cache
def all_imports() -> dict[str, list[Import]]:
    """module -> its kdcore imports (read when a test first needs them, not at collection)."""
    return {name: imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known())
            for name, path in MODULES.items()}


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def package_of(module: str) -> str | None:
    """The top-level package of a kdcore module (``engine`` for kdcore.engine.loop); None for the root."""
    parts = module.split(".")
    return None if len(parts) == 1 or parts[1] == "__main__" else parts[1]


# -- the reader itself ---------------------------------------------------------------------------

SAMPLE = '''
from __future__ import annotations
from typing import TYPE_CHECKING
import torch
from kdcore.losses import LogitLoss, functional as f
import kdcore.losses.functional
from . import splits
from .splits import DataSplits
from .. import common
from ..plugins.registry import Registry
if TYPE_CHECKING:
    from kdcore.engine.trainer import Trainer

def later():
    from kdcore.engine import distributed
    import kdcore
'''
SAMPLE_KNOWN = frozenset({"kdcore", "kdcore.common", "kdcore.data", "kdcore.data.splits", "kdcore.losses",
                          "kdcore.losses.functional", "kdcore.plugins", "kdcore.plugins.registry", "kdcore.engine",
                          "kdcore.engine.trainer", "kdcore.engine.distributed"})


def test_reader_sees_every_import():
    found = imports_of(SAMPLE, "kdcore.data.fingerprint", False, SAMPLE_KNOWN)
    assert sorted((i.target, i.name or "") for i in found) == sorted([
        ("kdcore.losses.functional", ""), ("kdcore.losses", "LogitLoss"), ("kdcore.losses.functional", "functional"),
        ("kdcore.data.splits", "splits"), ("kdcore.data.splits", "DataSplits"), ("kdcore.common", "common"),
        ("kdcore.plugins.registry", "Registry"), ("kdcore.engine.trainer", "Trainer"),
        ("kdcore.engine.distributed", "distributed"), ("kdcore", "")])
    in_init = imports_of("from . import splits\nfrom .splits import x\n", "kdcore.data", True, SAMPLE_KNOWN)
    assert [i.target for i in in_init] == ["kdcore.data.splits", "kdcore.data.splits"]


def test_sources_found():
    assert {"kdcore", "kdcore.engine", "kdcore.losses.functional"} <= set(MODULES)
    assert sum(len(found) for found in all_imports().values()) > 100
    assert len(PLUGIN_DIRS) >= 5


# -- (a) no cycle --------------------------------------------------------------------------------


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, first == last) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in components:
        start = min(comp)
        if len(comp) == 1 and start not in graph.get(start, ()):
            continue
        # the shortest path start -> ... -> start inside the component
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            following = []
            for v in frontier:
                for w in sorted(graph.get(v, set()) & comp):
                    if w not in previous:
                        previous[w] = v
                        following.append(w)
            frontier = following
        chain = [start]
        while len(chain) == 1 or chain[-1] != start:
            chain.append(previous[chain[-1]])
        cycles.append(chain[::-1])
    return sorted(cycles)


def test_cycle_finder():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}}) == [["a", "b", "c", "a"], ["d", "d"]]


def test_no_import_cycle():
    graph = {m: {i.target for i in found} for m, found in all_imports().items()}
    problems = []
    for chain in _cycles(graph):
        lines = [f"{a}: line {min(i.line for i in all_imports()[a] if i.target == b)} imports {b}"
                 for a, b in zip(chain, chain[1:])]
        problems.append(" -> ".join(chain) + "\n    " + "\n    ".join(lines))
    assert not problems, "import cycles among kdcore's modules:\n" + "\n".join(problems)


# -- (b) layers ----------------------------------------------------------------------------------


def test_every_package_is_in_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert not packages - set(LAYERS), (f"put the new package(s) {sorted(packages - set(LAYERS))} in a layer: "
                                        "LAYERS here and the table of docs/architecture.md")
    assert not set(LAYERS) - packages, f"LAYERS names packages that do not exist: {sorted(set(LAYERS) - packages)}"
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert not loose, f"modules directly under kdcore/ belong in a package of a layer: {loose}"
    no_init = sorted({rel(p.parent) for p in PACKAGE.rglob("*.py") if not (p.parent / "__init__.py").is_file()})
    assert not no_init, f"folders of modules without an __init__.py: {no_init}"


def _layer_problem(module: str, imp: Import) -> str | None:
    source = rel(MODULES[module])
    here, there = package_of(module), package_of(imp.target)
    if imp.target not in MODULES:
        old = imp.target.removeprefix("kdcore.")
        if old in old_paths():
            return (f"{source} imports {imp.target}, an old module path, at line {imp.line}: "
                    f"import from {' or '.join(old_paths()[old])}")
        return f"{source} imports {imp.target}, which is no module of kdcore, at line {imp.line}"
    if here is None or here == there:
        return None
    if there is None:
        if here in ROOT_IMPORT_ALLOWED:
            return None
        return (f"{source} imports the package root kdcore at line {imp.line}: "
                f"import {imp.name or 'the name'} from the module that defines it")
    if here not in LAYERS or there not in LAYERS:
        return f"{source} imports {imp.target} at line {imp.line}: kdcore.{here if here not in LAYERS else there} " \
               "is in no layer"
    if LAYERS[there] < LAYERS[here] or (here, there) in SAME_LAYER_ALLOWED:
        return None
    what = "a sibling package of the same layer" if LAYERS[there] == LAYERS[here] else "a higher layer"
    return (f"{source} imports {imp.target} (layer {LAYERS[there]} from layer {LAYERS[here]}: {what}) "
            f"at line {imp.line}")


def test_layer_rule():
    assert _layer_problem("kdcore.signals.store", Import("kdcore.engine.rundir", 41, "RunDir")) == \
        "kdcore/signals/store.py imports kdcore.engine.rundir (layer 4 from layer 3: a higher layer) at line 41"
    assert "sibling" in _layer_problem("kdcore.config.check", Import("kdcore.builtin.losses", 1, None))
    assert "package root" in _layer_problem("kdcore.losses.base", Import("kdcore", 1, "hookimpl"))
    assert "old module path" in _layer_problem("kdcore.engine.loop", Import("kdcore.functional", 1, "kl_rows"))
    assert _layer_problem("kdcore.engine.loop", Import("kdcore.losses.functional", 1, "kl_rows")) is None
    assert _layer_problem("kdcore.engine.loop", Import("kdcore.engine.rundir", 1, "RunDir")) is None
    assert _layer_problem("kdcore", Import("kdcore.engine", 1, "train")) is None


def test_imports_respect_the_layers():
    problems = sorted({p for m, found in all_imports().items() for i in found if (p := _layer_problem(m, i))})
    assert not problems, "imports that break the layers (docs/architecture.md):\n" + "\n".join(problems)


def test_plugin_loading_does_not_import_builtin():
    """The built-in plugin is imported by module name, like an entry point: no import statement."""
    names = [i.target for i in all_imports()["kdcore.plugins.loading"]]
    assert not [n for n in names if package_of(n) == "builtin"], names


# -- (c) docstrings ------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", PACKAGE_DIRS, ids=lambda p: module_name(p / "__init__.py", ROOT))
def test_package_docstring_names_its_layer(folder):
    init = folder / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
    assert doc.strip(), f"{rel(init)} has no docstring (say what the package holds and its layer)"
    assert re.search(r"\bLayer\b", doc), f"the docstring of {rel(init)} does not name its layer ('Layer N: ...')"
    top = folder.relative_to(PACKAGE).parts[0]
    for number in re.findall(r"\bLayer (\d+)", doc):
        assert int(number) == LAYERS.get(top), f"{rel(init)} says Layer {number}; LAYERS says {LAYERS.get(top)}"


# -- (d) the plugins' imports --------------------------------------------------------------------


def test_public_modules_exist():
    assert len(set(PUBLIC)) == len(PUBLIC)
    assert not set(PUBLIC) - set(MODULES), sorted(set(PUBLIC) - set(MODULES))


@pytest.mark.parametrize("plugin", PLUGIN_DIRS, ids=lambda p: p.name)
def test_plugin_uses_only_the_public_api(plugin):
    files = sorted(set(plugin.glob("kdcore_*/**/*.py")))
    assert files
    problems = []
    for path in files:
        module = module_name(path, plugin)
        for imp in imports_of(path.read_text(encoding="utf-8"), module, path.name == "__init__.py", known()):
            where = f"{rel(path)}:{imp.line}"
            if any(part.startswith("_") for part in imp.target.split(".")):
                problems.append(f"{where} imports the private module {imp.target}")
            elif imp.name is not None and imp.name.startswith("_"):
                problems.append(f"{where} imports the private name {imp.name} from {imp.target}")
            if imp.target not in PUBLIC:
                old = imp.target.removeprefix("kdcore.")
                hint = f" (an old path: use {' or '.join(old_paths()[old])})" if old in old_paths() else ""
                problems.append(f"{where} imports {imp.target}, which is not public API{hint}")
    assert not problems, "imports of kdcore's internals (docs/architecture.md):\n" + "\n".join(problems)


# -- (e) the old module paths --------------------------------------------------------------------


def test_every_old_path_has_names_to_check():
    assert set(old_paths()) == set(OLD_PATH_NAMES), \
        "OLD_PATH_NAMES here needs one public name per old path that kdcore/__init__.py installs"
    homes = {home for homes in old_paths().values() for home in homes}
    assert homes <= set(MODULES), f"the alias table names modules that do not exist: {sorted(homes - set(MODULES))}"
    for old, names in OLD_PATH_NAMES.items():
        assert set(names.values()) <= set(old_paths()[old]), (old, names)


OLD_CASES = [(old, name, home) for table in (OLD_PATH_NAMES, OLD_PACKAGE_NAMES)
             for old, names in table.items() for name, home in names.items()]


@pytest.mark.parametrize(("old", "name", "home"), OLD_CASES, ids=[f"{old}.{name}" for old, name, _ in OLD_CASES])
def test_old_path_still_imports(old, name, home):
    module = importlib.import_module(f"kdcore.{old}")
    new = getattr(importlib.import_module(home), name)
    assert getattr(module, name) is new
    space: dict = {}
    exec(f"from kdcore.{old} import {name} as found\nfrom kdcore import {old} as parent", space)
    assert space["found"] is new and getattr(space["parent"], name) is new


# -- (f), (g) the page ---------------------------------------------------------------------------


def _section(heading: str) -> list[str]:
    assert DOC.is_file(), "docs/architecture.md is missing"
    lines = DOC.read_text(encoding="utf-8").splitlines()
    starts = [k for k, line in enumerate(lines) if line.strip() == f"## {heading}"]
    assert len(starts) == 1, f"docs/architecture.md needs one section '## {heading}'"
    body = []
    for line in lines[starts[0] + 1:]:
        if line.startswith("## "):
            break
        body.append(line)
    return body


def test_doc_lists_the_public_modules():
    rows = [m["module"] for line in _section("Public API for plugins")
            if (m := re.match(r"^\|\s*`(?P<module>kdcore[\w.]*)`\s*\|", line))]
    assert len(rows) == len(set(rows)), "a module is listed twice"
    assert set(rows) == set(PUBLIC), (f"docs/architecture.md lists {sorted(set(rows) - set(PUBLIC))} that PUBLIC "
                                      f"does not, and lacks {sorted(set(PUBLIC) - set(rows))}")


def test_doc_lists_the_layers():
    rows = [(m["package"], int(m["layer"])) for line in _section("Layers")
            if (m := re.match(r"^\|\s*(?P<layer>\d+)\s*\|\s*`kdcore\.(?P<package>\w+)`\s*\|", line))]
    assert len(rows) == len(dict(rows)), "a package is listed twice"
    assert dict(rows) == LAYERS, f"docs/architecture.md's layer table: {dict(rows)}; LAYERS: {LAYERS}"
