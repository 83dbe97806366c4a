"""Nested components (``kdcore.build``): every error keeps the config's key path, and a
constructor's missing or unexpected argument is one line naming the parameter."""

from __future__ import annotations

import importlib.util
import pickle
import textwrap
from pathlib import Path

import pytest

import kdcore
from kdcore.common.errors import ConfigError, UnknownComponentError
from kdcore.config import check_components, from_dict
from kdcore.plugins import default_registry
from kdcore.plugins.registry import accepted_parameters, required_parameters

_spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).with_name("helpers_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)

#: a loss that builds its inner loss, and a schedule with a required parameter, as a user writes them
USER_CODE = textwrap.dedent('''
    import kdcore
    from torch import nn

    class Wrapper(nn.Module):
        """A loss that scales an inner loss built by name."""
        def __init__(self, inner="kd", scale=1.0):
            super().__init__()
            self.inner = kdcore.build("loss", inner, "inner")
            self.scale = scale

        def forward(self, student, teacher, target):
            return self.scale * self.inner(student, teacher, target)

    class AnnealedStop:
        """A schedule whose parameter has no default."""
        def __init__(self, decay_epochs, floor=0.0):
            self.decay_epochs, self.floor = decay_epochs, floor

        def __call__(self, progress):
            return max(self.floor, 1.0 - progress.epoch / self.decay_epochs)
''')


def _train_error(tmp_path: Path, capsys, term: dict, **tables) -> tuple[int, str]:
    """``kdcore train`` on a small config whose second loss term is ``term``: (exit status, the one line)."""
    (tmp_path / "user_parts.py").write_text(USER_CODE)
    conf = runs.student_config(str(tmp_path / "teacher.pt"), epochs=1)
    conf["loss"] = [{"name": "ce"}, term]
    conf.update(tables)
    path = runs.write(tmp_path / "run.toml", conf)
    code, err = runs.cli(capsys, "train", str(path), "--out", str(tmp_path / "out"))
    return code, runs.one_line(err)


def _unknown(path: str, kind: str, name: str, close: str) -> str:
    """The start of the unknown-name line (the list of what is available follows)."""
    return f"kdcore: error: {path}: unknown {kind} {name!r}; did you mean {close}? (available: "


#: (the second [[loss]] table or extra tables, the exact line, or the start of an unknown-name line)
NESTED = {
    "user loss: inner parameter": (
        {"name": "python:user_parts:Wrapper", "inner": {"name": "kd", "temperature": -1}},
        "kdcore: error: loss[1].inner.temperature: must be > 0, got -1"),
    "user loss: inner name": (
        {"name": "python:user_parts:Wrapper", "inner": "kdd"},
        _unknown("loss[1].inner", "loss", "kdd", "'kd', 'rkd', 'nkd'")),
    "user loss: inner table's name": (
        {"name": "python:user_parts:Wrapper", "inner": {"name": "kdd", "temperature": 2}},
        _unknown("loss[1].inner.name", "loss", "kdd", "'kd', 'rkd', 'nkd'")),
    "user loss: inner's divergence": (
        {"name": "python:user_parts:Wrapper", "inner": {"name": "kd", "divergence": {"name": "jsd", "beta": 7}}},
        "kdcore: error: loss[1].inner.divergence.beta: must be in (0, 1), got 7 (the family vanishes at the "
        "endpoints: use the divergence 'kl' or 'rkl' for those limits)"),
    "kd: divergence parameter": (
        {"name": "kd", "divergence": {"name": "ab", "alpha": 0.8, "beta": float("nan")}},
        "kdcore: error: loss[1].divergence.beta: must be finite, got nan"),
    "kd: divergence name": (
        {"name": "kd", "divergence": "jsdd"},
        _unknown("loss[1].divergence", "divergence", "jsdd", "'jsd'")),
    "dkd: nckd divergence parameter": (
        {"name": "dkd", "nckd_divergence": {"name": "skew_kl", "alpha": 3}},
        "kdcore: error: loss[1].nckd_divergence.alpha: must be in [0.0, 1.0), got 3"),
    "dkd: tckd divergence name": (
        {"name": "dkd", "tckd_divergence": {"name": "tvdd"}},
        _unknown("loss[1].tckd_divergence.name", "divergence", "tvdd", "'tvd'")),
    "nkd: divergence parameter": (
        {"name": "nkd", "divergence": {"name": "akl", "mu": -1}},
        "kdcore: error: loss[1].divergence.mu: must be in [0.0, 1.0], got -1"),
    "nkd: divergence name": (
        {"name": "nkd", "divergence": {"name": "skew_kll"}},
        _unknown("loss[1].divergence.name", "divergence", "skew_kll", "'skew_kl', 'skew_rkl'")),
    "tand: divergence parameter": (
        {"name": "tand", "divergence": {"name": "jsd", "beta": 0}},
        "kdcore: error: loss[1].divergence.beta: must be in (0, 1), got 0 (the family vanishes at the "
        "endpoints: use the divergence 'kl' or 'rkl' for those limits)"),
    "abkd: transform name": (
        {"name": "abkd", "transforms": ["label_smoothin"]},
        _unknown("loss[1].transforms[0]", "transform", "label_smoothin", "'label_smoothing'")),
    "tand: nkd divergence name": (
        {"name": "tand", "nkd_divergence": "rkll"},
        _unknown("loss[1].nkd_divergence", "divergence", "rkll", "'rkl', 'kl', 'akl'")),
    "abkd: transform parameter": (
        {"name": "abkd", "transforms": [{"name": "label_smoothing", "delta": 2}]},
        "kdcore: error: loss[1].transforms[0].delta: must be in [0.0, 1.0), got 2"),
    "ptloss: transform name": (
        {"name": "ptloss", "transforms": ["temperature", "ptloss_proxi"]},
        _unknown("loss[1].transforms[1]", "transform", "ptloss_proxi", "'ptloss_proxy'")),
    "ptloss: proxy transform parameter": (
        {"name": "ptloss", "transforms": [{"name": "ptloss_proxy", "epz": [0.1]}]},
        "kdcore: error: loss[1].transforms[0].epz: unknown parameter of transform 'ptloss_proxy' (accepted: eps)"),
    "schedule: missing parameter": (
        {"name": "kd", "schedule": {"name": "python:user_parts:AnnealedStop"}},
        "kdcore: error: loss[1].schedule.decay_epochs: required parameter missing (scheduler "
        "'python:user_parts:AnnealedStop' takes: decay_epochs, floor)"),
    "schedule: unexpected parameter": (
        {"name": "kd", "schedule": {"name": "python:user_parts:AnnealedStop", "decay_epochs": 3, "ceiling": 1}},
        "kdcore: error: loss[1].schedule.ceiling: unknown parameter of scheduler "
        "'python:user_parts:AnnealedStop' (accepted: decay_epochs, floor)"),
    "schedulers: missing parameter": (
        {"name": "kd", "schedule": {"name": "switch", "after": 0.5}},
        "kdcore: error: loss[1].schedule.epoch: required parameter missing (scheduler 'switch' takes: "
        "after, before, epoch)"),
    "schedulers: name": (
        {"name": "kd", "schedule": "cosin"},
        _unknown("loss[1].schedule", "scheduler", "cosin", "'cosine'")),
}


@pytest.mark.parametrize("case", list(NESTED))
def test_nested_error_names_its_key_path(tmp_path, capsys, case):
    term, expected = NESTED[case]
    code, line = _train_error(tmp_path, capsys, term)
    assert code == 2
    if expected.endswith("(available: "):
        assert line.startswith(expected) and line.endswith(")"), line
    else:
        assert line == expected


def test_weighting_and_batch_policy_schedule_keep_their_key_paths(tmp_path, capsys):
    code, line = _train_error(tmp_path, capsys, {"name": "kd"}, weighting={"name": "crossbatch", "nu": 1})
    assert (code, line.split(" (accepted")[0]) == (2, "kdcore: error: weighting.nu: unknown parameter of "
                                                      "scheduler 'crossbatch'")
    policy = {"name": "on_policy", "schedule": {"name": "switch", "after": 0.0}}
    code, line = _train_error(tmp_path, capsys, {"name": "kd"}, batch_policy=policy)
    assert (code, line) == (2, "kdcore: error: batch_policy.schedule.epoch: required parameter missing "
                               "(scheduler 'switch' takes: after, before, epoch)")
    policy = {"name": "on_policy", "schedule": "linaer"}
    code, line = _train_error(tmp_path, capsys, {"name": "kd"}, batch_policy=policy)
    assert code == 2 and line.startswith(_unknown("batch_policy.schedule", "scheduler", "linaer", "'linear', 'cosine'"))


def test_build_from_python_keeps_paths_and_types():
    with pytest.raises(UnknownComponentError) as info:
        kdcore.build("loss", {"name": "kd", "divergence": "jsdd"}, "loss[1].inner")
    assert isinstance(info.value, LookupError) and isinstance(info.value, ConfigError)
    assert str(info.value).startswith("loss[1].inner.divergence: unknown divergence 'jsdd'; did you mean 'jsd'?")
    again = pickle.loads(pickle.dumps(info.value))
    assert (type(again), str(again)) == (UnknownComponentError, str(info.value))
    with pytest.raises(ConfigError, match=r"^inner\.name: a loss table needs a 'name'$"):
        kdcore.build("loss", {"temperature": 2.0}, "inner")
    with pytest.raises(ConfigError, match=r"^inner: expected a loss name, a table with 'name', or a loss object"):
        kdcore.build("loss", 3, "inner")
    with pytest.raises(ConfigError) as info:
        kdcore.build("loss", {"name": "python:no_such_module_here:Loss"}, "loss[1].inner")
    assert str(info.value) == ("loss[1].inner.name: 'python:no_such_module_here:Loss': no module "
                               "'no_such_module_here' (looked in sys.path)")
    div = kdcore.build("divergence", {"name": "kl"}, "divergence")
    assert kdcore.build("divergence", div, "divergence") is div


def test_a_constructor_type_error_names_the_key_path_once():
    """A TypeError the parameter check cannot foresee (the factory takes ``**kw``) is
    one line under the key path, not ``PATH.scheduler 'NAME': ...``."""
    def factory(**options):
        raise TypeError(f"unexpected option {sorted(options)[0]!r}")

    registry = default_registry()
    table = {**registry.components, "scheduler": {**registry.components["scheduler"]}}
    table["scheduler"]["strict"] = type(registry.get("scheduler", "fixed"))("scheduler", "strict", factory, "test")
    registry = type(registry)(table)
    with pytest.raises(ConfigError) as info:
        kdcore.build("scheduler", {"name": "strict", "speed": 1}, "loss[1].schedule", registry=registry)
    assert str(info.value) == "loss[1].schedule: scheduler 'strict': unexpected option 'speed'"


def _components():
    registry = default_registry()
    return [(kind, name) for kind in registry.components for name in registry.available(kind)]


@pytest.mark.parametrize("kind,name", _components(), ids=lambda v: str(v))
def test_every_factory_refuses_unknown_and_missing_parameters_with_the_key_path(kind, name):
    registry = default_registry()
    factory = registry.get(kind, name).factory
    accepted, open_ended = accepted_parameters(factory)
    required = required_parameters(factory)
    key = f"section[1].{kind}"
    if not open_ended:  # a factory that takes **kw (torchvision's models) judges its options itself
        with pytest.raises(ConfigError) as info:
            kdcore.build(kind, {"name": name, "zz_unknown": 1, **{p: 1 for p in required}}, key, registry=registry)
        assert str(info.value) == (f"{key}.zz_unknown: unknown parameter of {kind} {name!r} "
                                   f"(accepted: {', '.join(sorted(accepted)) or 'none'})")
    for missing in required:
        given = {p: 1 for p in required if p != missing}
        with pytest.raises(ConfigError) as info:
            kdcore.build(kind, {"name": name, **given}, key, registry=registry)
        assert str(info.value).startswith(f"{key}.{missing}: required parameter missing ({kind} {name!r} takes: ")
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("term, key", [
    ({"name": "python:no_such_module_here:Loss"}, "loss[1].name"),
    ({"name": "kd", "divergence": "python:no_such_module_here:Div"}, "loss[1].divergence"),
    ({"name": "kd", "transforms": ["temperature", {"name": "python:no_such_module_here:T"}]},
     "loss[1].transforms[1].name"),
])
def test_a_python_reference_that_does_not_resolve_names_its_key_in_the_config_check(term, key):
    conf = {"data": {"name": "gaussian_mixture", "n": 100}, "student": {"backbone": "mlp"},
            "loss": [{"name": "ce"}, term]}
    with pytest.raises(ConfigError) as info:
        check_components(from_dict(conf), default_registry())
    assert str(info.value).startswith(f"{key}: 'python:no_such_module_here:")
