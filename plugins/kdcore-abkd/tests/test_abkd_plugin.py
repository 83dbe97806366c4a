"""Packaging: the plugin stands alone on kdcore (no kdcore-dkd) and registers its names."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata


def test_depends_only_on_kdcore():
    runtime = [r for r in metadata.requires("kdcore-abkd") or [] if "extra ==" not in r]
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in runtime}
    assert names == {"kdcore", "torch"}


def test_registers_with_only_this_plugin_loaded():
    env = dict(os.environ, KDCORE_PLUGINS="abkd")
    out = subprocess.run([sys.executable, "-m", "kdcore", "list", "--json"], env=env,
                         capture_output=True, text=True, check=True).stdout
    listed = {kind: {(c["name"], c["plugin"]) for c in comps} for kind, comps in json.loads(out).items()}
    assert {("abkd", "abkd"), ("abdkd", "abkd")} <= listed["loss"]
    assert ("ab", "abkd") in listed["divergence"]
    assert not any(plugin not in ("abkd", "builtin") for comps in listed.values() for _, plugin in comps)


def test_kdcore_list_with_only_this_plugin():
    """``kdcore list loss`` / ``kdcore list divergence`` (plain text) with only kdcore
    and kdcore-abkd enabled show ``abkd``, ``abdkd`` and ``ab``; no other plugin's names."""
    env = dict(os.environ, KDCORE_PLUGINS="abkd")

    def listed(kind):
        out = subprocess.run([sys.executable, "-m", "kdcore", "list", kind], env=env,
                             capture_output=True, text=True, check=True).stdout
        return set(out.split())

    losses = listed("loss")
    assert {"abkd", "abdkd"} <= losses and not {"dkd", "nkd", "tand"} & losses
    assert "ab" in listed("divergence")
    env["KDCORE_PLUGINS"] = ""
    assert "abkd" not in listed("loss")
