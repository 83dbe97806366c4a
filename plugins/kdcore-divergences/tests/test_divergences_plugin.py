"""Packaging: the plugin stands alone on kdcore, is found through its entry
point, and registers its five divergences."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata

import kdcore
from kdcore.plugins import default_registry

NAMES = {"jsd", "skew_kl", "skew_rkl", "tvd", "akl"}


def test_depends_only_on_kdcore():
    runtime = [r for r in metadata.requires("kdcore-divergences") or [] if "extra ==" not in r]
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in runtime}
    assert names == {"kdcore", "torch"}


def test_entry_point():
    eps = [ep for ep in metadata.entry_points(group="kdcore") if ep.name == "divergences"]
    assert len(eps) == 1 and eps[0].value == "kdcore_divergences.plugin"
    assert eps[0].dist.name == "kdcore-divergences"


def test_registered_in_process():
    assert NAMES <= set(kdcore.available("divergence"))
    plugins = {p.name: p for p in default_registry().plugins}
    assert "divergences" in plugins
    assert {c.name for c in plugins["divergences"].components if c.kind == "divergence"} == NAMES


def _run(*args, plugins="divergences"):
    env = dict(os.environ, KDCORE_PLUGINS=plugins)
    return subprocess.run([sys.executable, "-m", "kdcore", *args], env=env, capture_output=True, text=True,
                          check=True).stdout


def test_kdcore_plugins_json_lists_it():
    out = json.loads(_run("plugins", "--json"))
    mine = [p for p in out["plugins"] if p["name"] == "divergences"]
    assert len(mine) == 1
    assert mine[0]["distribution"] == "kdcore-divergences"
    assert set(mine[0]["registered"]["divergence"]) == NAMES
    assert not [f for f in out["failed"] if f["name"] == "divergences"]
    assert {p["name"] for p in out["plugins"]} == {"builtin", "divergences"}


def test_kdcore_list_with_only_this_plugin():
    listed = {kind: {(c["name"], c["plugin"]) for c in comps}
              for kind, comps in json.loads(_run("list", "--json")).items()}
    assert {(n, "divergences") for n in NAMES} <= listed["divergence"]
    assert not any(plugin not in ("divergences", "builtin") for comps in listed.values() for _, plugin in comps)
    assert not NAMES & set(_run("list", "divergence", plugins="").split())
