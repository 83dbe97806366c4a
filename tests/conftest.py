"""Fixtures shared by the core's tests: the third-party test plugin of
helpers_plugin.py, installed as a fake distribution with an entry point."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from kdcore.plugins import load_registry

_spec = importlib.util.spec_from_file_location("helpers_plugin", Path(__file__).with_name("helpers_plugin.py"))
plug = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plug)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder holding the installed test plugin ``kdcore-hinttest``, on ``sys.path``."""
    root = plug.install(tmp_path_factory.mktemp("site"))
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


@pytest.fixture(scope="module")
def registry(site):
    """The built-in plugin and the test plugin, found through its entry point."""
    return load_registry(env={}, entry_points=plug.entry_points(site))
