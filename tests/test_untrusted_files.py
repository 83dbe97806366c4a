"""Files that kdcore reads may come from anyone (a downloaded checkpoint, a dataset
copied from elsewhere), so no file may run code when it is read. This test lists every
call in the package code of kdcore and of the plugins that deserialises a file
(pickle, torch.load, numpy.load, joblib, yaml, ...) by walking the source's syntax
trees, and asserts that each is safe: ``torch.load`` with ``weights_only=True``,
``numpy.load`` with ``allow_pickle=False``, ``yaml.load`` with a safe loader, and
pickles only through an ``Unpickler`` subclass whose ``find_class`` refuses what it
does not know. A new unsafe call fails it."""

from __future__ import annotations

import ast
import importlib
import io
import pickle
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "kdcore").rglob("*.py"), *(ROOT / "plugins").glob("*/kdcore_*/**/*.py")])

#: loaders that run whatever the file holds, whatever their arguments
UNSAFE = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "_pickle.Unpickler",
          "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load", "marshal.load",
          "marshal.loads", "shelve.open", "pandas.read_pickle", "torch.jit.load", "yaml.unsafe_load",
          "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"}
#: yaml loaders that build plain data only
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}


def imported_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it was imported as, for every import in the module
    (those inside functions included)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def qualified(node: ast.AST, names: dict[str, str]) -> str | None:
    """``np.load`` -> ``numpy.load``: the dotted name an expression refers to through the
    module's imports (None for anything not reached from an import)."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        base = qualified(node.value, names)
        return None if base is None else f"{base}.{node.attr}"
    return None


def keyword_is(call: ast.Call, key: str, value: object) -> bool:
    """The call passes ``key=value`` with ``value`` a literal constant."""
    return any(k.arg == key and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def verdict(name: str, call: ast.Call, names: dict[str, str]) -> str | None:
    """Why a deserialising call is unsafe, "" where it is safe, None where it deserialises nothing."""
    name = {"numpy.lib.npyio.load": "numpy.load", "torch.serialization.load": "torch.load"}.get(name, name)
    if name in UNSAFE:
        return f"{name} runs code from the file"
    if name == "torch.load":
        return "" if keyword_is(call, "weights_only", True) else "torch.load without weights_only=True"
    if name == "numpy.load":
        return "" if keyword_is(call, "allow_pickle", False) else "numpy.load without allow_pickle=False"
    if name in ("yaml.load", "yaml.load_all"):
        loader = [k.value for k in call.keywords if k.arg == "Loader"] + call.args[1:2]
        return "" if loader and qualified(loader[0], names) in SAFE_YAML_LOADERS else f"{name} without a safe Loader"
    return None


def unpickler_classes(tree: ast.Module, names: dict[str, str]) -> list[ast.ClassDef]:
    """Classes of the module that subclass ``pickle.Unpickler``."""
    return [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
            and any(qualified(b, names) in ("pickle.Unpickler", "_pickle.Unpickler") for b in node.bases)]


def scan(source: str) -> tuple[list[tuple[int, str, str]], list[ast.ClassDef]]:
    """Every deserialising call of ``source`` as (line, name, why unsafe or ""), and its Unpickler subclasses."""
    tree = ast.parse(source)
    names = imported_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = qualified(node.func, names)
            why = None if name is None else verdict(name, node, names)
            if why is not None:
                found.append((node.lineno, name, why))
    return found, unpickler_classes(tree, names)


def module_of(path: Path) -> str:
    """The importable module name of a source file of kdcore or of a plugin."""
    if path.is_relative_to(ROOT / "plugins"):
        rel = path.relative_to(ROOT / "plugins" / path.relative_to(ROOT / "plugins").parts[0])
    else:
        rel = path.relative_to(ROOT)
    return ".".join(rel.with_suffix("").parts).removesuffix(".__init__")


SCANNED = {path: scan(path.read_text()) for path in SOURCES}


def test_every_deserialising_call_in_package_code_is_safe():
    unsafe = [f"{p.relative_to(ROOT)}:{line}: {why}" for p, (calls, _) in SCANNED.items()
              for line, _, why in calls if why]
    assert not unsafe, "unsafe loads of files:\n" + "\n".join(unsafe)


def test_the_walk_finds_the_known_loads():
    files = {name: {p for p, (calls, _) in SCANNED.items() for _, n, _ in calls if n == name}
             for name in ("torch.load", "numpy.load")}
    assert len(files["torch.load"]) >= 3 and files["numpy.load"]  # checkpoints, teacher files, zoo weights, ...
    classes = {(str(p.relative_to(ROOT)), c.name) for p, (_, cs) in SCANNED.items() for c in cs}
    assert ("plugins/kdcore-vision/kdcore_vision/cifar.py", "CifarUnpickler") in classes


@pytest.mark.parametrize("path, cls", [(p, c.name) for p, (_, cs) in SCANNED.items() for c in cs],
                         ids=lambda v: v if isinstance(v, str) else v.name)
def test_every_unpickler_refuses_what_it_does_not_know(path, cls):
    unpickler = getattr(importlib.import_module(module_of(path)), cls)
    assert "find_class" in vars(unpickler), f"{cls} keeps pickle's find_class, which imports anything"
    reader = unpickler(io.BytesIO(b""))
    for module, name in [("os", "system"), ("builtins", "eval"), ("__builtin__", "exec"), ("subprocess", "Popen"),
                         ("torch", "load"), ("pickle", "loads")]:
        with pytest.raises(pickle.UnpicklingError):
            reader.find_class(module, name)


UNSAFE_SNIPPET = """
import pickle, yaml, joblib
import numpy as np
import torch as T
from torch import load as tload
from pickle import loads
from yaml import Loader

def read(f, kw):
    pickle.load(f)
    loads(b"")
    pickle.Unpickler(f).load()
    joblib.load(f)
    T.load(f)
    tload(f, weights_only=False)
    T.load(f, **kw)
    np.load(f)
    np.load(f, allow_pickle=True)
    yaml.load(f)
    yaml.load(f, Loader=Loader)
    yaml.unsafe_load(f)
"""

SAFE_SNIPPET = """
import numpy
import torch
import yaml
from yaml import SafeLoader

def read(f, load):
    torch.load(f, map_location="cpu", weights_only=True)
    numpy.load(f, allow_pickle=False)
    yaml.load(f, Loader=SafeLoader)
    yaml.load(f, yaml.CSafeLoader)
    yaml.safe_load(f)
    load(f)
"""


def test_the_walk_flags_each_unsafe_form_and_passes_the_safe_ones():
    calls, _ = scan(UNSAFE_SNIPPET)
    assert len(calls) == 12 and all(why for _, _, why in calls), calls
    calls, _ = scan(SAFE_SNIPPET)
    assert [why for _, _, why in calls] == ["", "", "", ""]
