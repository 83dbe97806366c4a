"""Lazy factories (``register(name, "module:attribute")``) and what the cheap commands import."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch

from kdcore.common.errors import PluginError
from kdcore.plugins import PluginWarning, load_registry
from kdcore.plugins.hookspecs import hookimpl

#: modules that ``kdcore --help``, ``kdcore list`` and ``kdcore plugins`` must not import
HEAVY = ("torchvision", "tensorboard", "torch.utils.tensorboard", "transformers", "scipy", "matplotlib",
         "sklearn", "pandas", "kdcore.engine", "kdcore.cli.demo")


def _plugin(name: str, target) -> types.ModuleType:
    mod = types.ModuleType(name)

    @hookimpl
    def register_losses(register):
        register("lazy", target)

    mod.register_losses = register_losses
    return mod


def _registry(target):
    return load_registry(env={"KDCORE_PLUGINS": ""}, extra_plugins=[("lazyplug", _plugin("lazyplug", target))])


def test_a_lazy_factory_is_listed_without_import_and_imported_on_create(tmp_path, monkeypatch):
    (tmp_path / "kd_lazy_target_mod.py").write_text(
        "import torch\nfrom kdcore.losses import LogitLoss\n"
        "class Half(LogitLoss):\n"
        "    def __init__(self, *, scale: float = 0.5):\n"
        "        super().__init__()\n"
        "        self.scale = scale\n"
        "    def rows(self, student, teacher, target):\n"
        "        return self.scale * student.sum(-1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = _registry("kd_lazy_target_mod:Half")
    assert "lazy" in reg.available("loss")
    assert "kd_lazy_target_mod" not in sys.modules
    loss = reg.create("loss", "lazy", scale=2.0)
    assert "kd_lazy_target_mod" in sys.modules
    assert type(loss).__name__ == "Half" and loss.scale == 2.0
    s = torch.ones(3, 4)
    assert float(loss(s, s, torch.zeros(3, dtype=torch.long))) == pytest.approx(8.0)
    with pytest.raises(Exception, match="scal"):  # parameters are checked against the imported factory
        reg.create("loss", "lazy", scal=1.0)
    sys.modules.pop("kd_lazy_target_mod", None)


@pytest.mark.parametrize("target,match", [
    ("kd_no_such_module_xyz:Thing", r"loss 'lazy' of plugin 'lazyplug': lazy factory "
                                    r"'kd_no_such_module_xyz:Thing': importing 'kd_no_such_module_xyz' failed"),
    ("kdcore.losses:NoSuchLoss", r"module 'kdcore.losses' has no attribute 'NoSuchLoss'"),
    ("kdcore.losses:IGNORE_INDEX", r"'IGNORE_INDEX' is not a class or function"),
])
def test_a_broken_lazy_factory_is_a_clear_plugin_error_on_create(target, match):
    reg = _registry(target)
    assert "lazy" in reg.available("loss")  # listing does not import it
    with pytest.raises(PluginError, match=match):
        reg.create("loss", "lazy")


def test_a_malformed_lazy_factory_is_refused_at_registration():
    with pytest.warns(PluginWarning, match="neither callable nor a lazy 'module:attribute'"):
        reg = _registry("not a target")
    assert "lazy" not in reg.available("loss")
    assert [f.name for f in reg.failed] == ["lazyplug"]


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["list", "loss", "--json"], ["plugins"]])
def test_cheap_commands_do_not_import_heavy_modules(argv):
    code = ("import json, sys\n"
            "from kdcore.cli import main\n"
            "try:\n"
            f"    rc = main({argv!r})\n"
            "except SystemExit as e:\n"
            "    rc = e.code\n"
            f"heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in {HEAVY!r}))\n"
            "print('\\nRESULT', json.dumps({'rc': rc, 'heavy': heavy}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.rsplit("RESULT", 1)[1])
    assert result["rc"] == 0
    assert result["heavy"] == []
