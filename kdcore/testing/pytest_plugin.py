"""A pytest plugin for plugin authors: every component of a plugin, checked.

Enable it in the plugin's ``tests/conftest.py``::

    pytest_plugins = ["kdcore.testing.pytest_plugin"]

(or ``pytest -p kdcore.testing.pytest_plugin``). A test that takes the
argument ``kdcore_component`` is then run once per registered component, as a
``(kind, name)`` pair, of the plugins named by the ini option
``kdcore_plugins`` (entry-point names, space separated; default: every
installed plugin), and the fixture ``kdcore_registry`` is the installed
plugins' registry, rebuilt for the session::

    from kdcore.testing import check_component

    def test_component_follows_the_conventions(kdcore_component):
        check_component(*kdcore_component)
"""

from __future__ import annotations

import pytest

from kdcore.testing.components import CHECKED_KINDS


def pytest_addoption(parser) -> None:
    parser.addini("kdcore_plugins", "entry-point names of the plugins whose components "
                  "kdcore_component runs over (default: all installed)", type="args", default=[])


def _registry():
    from kdcore.plugins import load_registry

    return load_registry()


@pytest.fixture(scope="session")
def kdcore_registry():
    """The registry of the installed plugins (built once for the session)."""
    return _registry()


def pytest_generate_tests(metafunc) -> None:
    if "kdcore_component" not in metafunc.fixturenames:
        return
    wanted = set(metafunc.config.getini("kdcore_plugins"))
    reg = _registry()
    found = [(kind, name) for kind in CHECKED_KINDS for name in reg.available(kind)
             if not wanted or reg.get(kind, name).plugin in wanted]
    metafunc.parametrize("kdcore_component", found, ids=[f"{k}:{n}" for k, n in found])
