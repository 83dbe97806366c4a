"""kdcore finds the plugin through its entry point (installed, not only importable),
and every component it registers passes kdcore.testing's checks of its kind.
Needs the plugin installed: ``pip install -e "examples/kdcore-dist[test]"``."""

from __future__ import annotations

import importlib.metadata as md

import pytest

import kdcore
from kdcore.plugins import load_registry
from kdcore.testing import CHECKED_KINDS, check_component, components


def test_the_entry_point_is_installed():
    found = {ep.name: ep for ep in md.entry_points(group="kdcore")}
    assert "dist" in found, 'not installed: pip install -e "examples/kdcore-dist[test]"'
    assert found["dist"].value == "kdcore_dist.plugin"


def test_kdcore_registers_both_components_from_this_plugin():
    registry = load_registry()
    assert registry.get("loss", "dist").plugin == "dist"
    assert registry.get("divergence", "pearson").plugin == "dist"
    assert "dist" in kdcore.available("loss") and "pearson" in kdcore.available("divergence")


MINE = [(kind, name) for kind in CHECKED_KINDS for name in components(kind, plugin="dist")]


@pytest.mark.parametrize(("kind", "name"), MINE or [pytest.param(None, None, marks=pytest.mark.skip("not installed"))])
def test_each_component_follows_the_conventions_of_its_kind(kind, name):
    check_component(kind, name)


def test_both_components_are_checked():
    assert MINE == [("loss", "dist"), ("divergence", "pearson")]
