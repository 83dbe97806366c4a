"""Plugin discovery through entry points, with fake distributions on disk."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kdcore
from kdcore.common.errors import DuplicateComponentError, PluginError
from kdcore.plugins import PluginWarning, load_registry

GOOD = """
import kdcore
from kdcore.losses import LogitLoss

class Zero(LogitLoss):
    def __init__(self, *, scale: float = 1.0):
        super().__init__()
        self.scale = scale
    def rows(self, student, teacher, target):
        return 0.0 * student.sum(-1) * self.scale

@kdcore.hookimpl
def register_losses(register):
    register("zero", Zero)

@kdcore.hookimpl
def register_schedulers(register):
    register("half", lambda: (lambda progress: 0.5))
"""


def make_dist(root: Path, dist: str, version: str, eps: dict[str, str], modules: dict[str, str]) -> None:
    """A fake installed distribution: modules plus a dist-info with entry points."""
    for mod, src in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(src))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "\n".join(f"{k} = {v}" for k, v in eps.items())
    (info / "entry_points.txt").write_text(f"[kdcore]\n{lines}\n")


def entry_points(root: Path) -> list[md.EntryPoint]:
    return [ep for d in md.distributions(path=[str(root)]) for ep in d.entry_points if ep.group == "kdcore"]


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("fake_kd_")]:
        del sys.modules[name]


def test_good_plugin_records_its_distribution(site):
    make_dist(site, "kdcore-zero", "1.2.3", {"zero": "fake_kd_zero"}, {"fake_kd_zero": GOOD})
    reg = load_registry(env={}, entry_points=entry_points(site))
    assert "zero" in reg.available("loss") and "half" in reg.available("scheduler")
    comp = reg.get("loss", "zero")
    assert (comp.plugin, comp.dist, comp.version) == ("zero", "kdcore-zero", "1.2.3")
    assert reg.get("loss", "kd").plugin == "builtin" and reg.get("loss", "kd").dist == "kdcore"
    assert reg.create("scheduler", "half")(None) == 0.5
    assert float(reg.create("loss", "zero", scale=2.0)(*[__import__("torch").ones(2, 3)] * 2)) == 0.0


def test_broken_import_is_reported_not_fatal(site):
    make_dist(site, "kdcore-bad", "0.1", {"bad": "fake_kd_bad"}, {"fake_kd_bad": "raise ImportError('no torch_xyz')"})
    make_dist(site, "kdcore-zero", "1.0", {"zero": "fake_kd_zero"}, {"fake_kd_zero": GOOD})
    with pytest.warns(PluginWarning, match="bad"):
        reg = load_registry(env={}, entry_points=entry_points(site))
    assert [f.name for f in reg.failed] == ["bad"]
    assert "no torch_xyz" in reg.failed[0].reason and reg.failed[0].dist == "kdcore-bad"
    assert "zero" in reg.available("loss")


def test_strict_mode_makes_a_broken_plugin_fatal(site):
    make_dist(site, "kdcore-bad", "0.1", {"bad": "fake_kd_bad"}, {"fake_kd_bad": "1/0"})
    with pytest.raises(PluginError, match="bad.*ZeroDivisionError"):
        load_registry(env={"KDCORE_STRICT_PLUGINS": "1"}, entry_points=entry_points(site))


def test_unknown_hook_is_reported(site):
    src = "import kdcore\n@kdcore.hookimpl\ndef register_lossez(register):\n    pass\n"
    make_dist(site, "kdcore-typo", "0.1", {"typo": "fake_kd_typo"}, {"fake_kd_typo": src})
    with pytest.warns(PluginWarning):
        reg = load_registry(env={}, entry_points=entry_points(site))
    assert "register_lossez" in reg.failed[0].reason


def test_hook_that_raises_contributes_nothing(site):
    src = """
import kdcore
@kdcore.hookimpl
def register_losses(register):
    register("half_done", object)
    raise RuntimeError("boom")
"""
    make_dist(site, "kdcore-raise", "0.1", {"raise": "fake_kd_raise"}, {"fake_kd_raise": src})
    with pytest.warns(PluginWarning, match="boom"):
        reg = load_registry(env={}, entry_points=entry_points(site))
    assert "half_done" not in reg.available("loss")


def test_duplicate_name_names_both_plugins(site):
    dup = "import kdcore\n@kdcore.hookimpl\ndef register_losses(register):\n    register('kd', object)\n"
    make_dist(site, "kdcore-dup", "0.1", {"dup": "fake_kd_dup"}, {"fake_kd_dup": dup})
    with pytest.warns(PluginWarning) as record:
        reg = load_registry(env={}, entry_points=entry_points(site))
    msg = reg.failed[0].reason
    assert "'builtin'" in msg and "'dup'" in msg and "kd" in msg
    assert reg.get("loss", "kd").plugin == "builtin"
    assert record
    with pytest.raises(DuplicateComponentError, match="builtin.*dup"):
        load_registry(env={"KDCORE_STRICT_PLUGINS": "1"}, entry_points=entry_points(site))


def test_allow_list_and_empty_list(site):
    make_dist(site, "kdcore-zero", "1.0", {"zero": "fake_kd_zero"}, {"fake_kd_zero": GOOD})
    make_dist(site, "kdcore-bad", "0.1", {"bad": "fake_kd_bad"}, {"fake_kd_bad": "1/0"})
    eps = entry_points(site)
    only = load_registry(env={"KDCORE_PLUGINS": "zero"}, entry_points=eps)
    assert "zero" in only.available("loss") and not only.failed  # bad was never imported
    none = load_registry(env={"KDCORE_PLUGINS": ""}, entry_points=eps)
    assert [p.name for p in none.plugins] == ["builtin"]
    assert none.available("loss") == ["ce", "kd", "rkd"]


def test_create_errors():
    with pytest.raises(kdcore.UnknownComponentError, match="did you mean 'kd'") as info:
        kdcore.create("loss", "kdd")
    assert isinstance(info.value, LookupError)
    with pytest.raises(kdcore.ConfigError, match=r"temprature: unknown parameter.*accepted: .*temperature"):
        kdcore.create("loss", "kd", temprature=2.0)
    with pytest.raises(kdcore.ConfigError, match="temperature: must be > 0"):
        kdcore.create("loss", "kd", temperature=0)
    with pytest.raises(kdcore.ConfigError, match="unknown component kind"):
        kdcore.available("losses")


def test_cli_discovers_an_installed_third_party_plugin(tmp_path):
    """A real interpreter finds the fake distribution through importlib.metadata."""
    make_dist(tmp_path, "kdcore-zero", "1.0", {"zero": "fake_kd_zero"}, {"fake_kd_zero": GOOD})
    make_dist(tmp_path, "kdcore-bad", "0.1", {"bad": "fake_kd_bad"}, {"fake_kd_bad": "import nope_nope"})
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("KDCORE_PLUGINS", None)
    out = subprocess.run([sys.executable, "-m", "kdcore", "plugins", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    zero = next(p for p in data["plugins"] if p["name"] == "zero")
    assert zero["distribution"] == "kdcore-zero" and zero["registered"]["loss"] == ["zero"]
    assert data["failed"][0]["name"] == "bad" and "nope_nope" in data["failed"][0]["reason"]
    assert "bad" in out.stderr  # reported on stderr too
    strict = subprocess.run([sys.executable, "-m", "kdcore", "list", "loss"],
                            env={**env, "KDCORE_STRICT_PLUGINS": "1"}, capture_output=True, text=True, timeout=120)
    assert strict.returncode == 1 and "bad" in strict.stderr and "Traceback" not in strict.stderr


EVERY_HOOK = """
import kdcore, torch
from kdcore.data import DataSplits, TensorSplit

@kdcore.hookimpl
def register_losses(register):
    register("every_loss", lambda: (lambda s, t, y: (s - t).pow(2).mean()))

@kdcore.hookimpl
def register_divergences(register):
    register("every_div", lambda: (lambda p, q: (p.exp() - q.exp()).abs().sum(-1)))

@kdcore.hookimpl
def register_transforms(register):
    register("every_tf", lambda: (lambda logp, y: logp))

@kdcore.hookimpl
def register_schedulers(register):
    register("every_sched", lambda: (lambda progress: 1.0))

@kdcore.hookimpl
def register_backbones(register):
    register("every_net", lambda num_classes: torch.nn.Linear(4, num_classes))

@kdcore.hookimpl
def register_datasets(register):
    def make():
        x, y = torch.randn(8, 4), torch.arange(8) % 2
        return DataSplits(TensorSplit(x, y), None, None, num_classes=2, input_shape=(4,))
    register("every_data", make)

@kdcore.hookimpl
def register_commands(cli):
    p = cli.add_parser("hello", help="say hello")
    p.add_argument("--name", default="world")
    def run(args):
        if args.name == "bad":
            raise kdcore.ConfigError("--name: 'bad' is not a name")
        print(f"hello {args.name}")
        return 0
    p.set_defaults(handler=run)
"""


def test_every_hook_from_a_third_party_plugin(tmp_path):
    make_dist(tmp_path, "kdcore-every", "0.2", {"every": "fake_kd_every"}, {"fake_kd_every": EVERY_HOOK})
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("KDCORE_PLUGINS", None)
    script = """
import json, torch, kdcore
out = {k: kdcore.available(k) for k in ["loss", "divergence", "transform", "scheduler", "backbone", "dataset"]}
net = kdcore.create("backbone", "every_net", num_classes=3)
out["net_out"] = list(net(torch.zeros(2, 4)).shape)
out["data"] = len(kdcore.create("dataset", "every_data").train)
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    for kind, name in [("loss", "every_loss"), ("divergence", "every_div"), ("transform", "every_tf"),
                       ("scheduler", "every_sched"), ("backbone", "every_net"), ("dataset", "every_data")]:
        assert name in got[kind]
    assert got["net_out"] == [2, 3] and got["data"] == 8
    hello = subprocess.run([sys.executable, "-m", "kdcore", "hello", "--name", "kd"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert hello.returncode == 0 and hello.stdout.strip() == "hello kd"
    bad = subprocess.run([sys.executable, "-m", "kdcore", "hello", "--name", "bad"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--name: 'bad'" in bad.stderr and "Traceback" not in bad.stderr


def test_components_resolve_named_components_from_the_registry_building_them():
    """A loss built by a registry finds the divergence it names in that registry,
    not in the default one (a registry with an extra plugin, as tests and
    notebooks build them)."""
    import types

    import torch

    mod = types.ModuleType("extra_div")

    @kdcore.hookimpl
    def register_divergences(register):
        register("half_kl", lambda: (lambda t, s: 0.5 * (t.exp() * (t - s)).sum(-1)))

    mod.register_divergences = register_divergences
    reg = load_registry(env={"KDCORE_PLUGINS": ""}, extra_plugins=[("extra_div", mod)])
    loss = reg.create("loss", "kd", temperature=1.0, divergence="half_kl")
    full = reg.create("loss", "kd", temperature=1.0)
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(loss(s, t, None), 0.5 * full(s, t, None))
    with pytest.raises(kdcore.UnknownComponentError, match="half_kl"):
        kdcore.create("loss", "kd", divergence="half_kl")
