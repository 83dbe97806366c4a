"""Registration of ``tand`` and parameter validation."""

import pytest

import kdcore
from kdcore.plugins import default_registry, load_registry


def test_registered_by_this_plugin():
    assert default_registry().get("loss", "tand").plugin == "tand"


def test_loads_without_the_nkd_and_dkd_plugins_enabled():
    """tand imports kdcore_nkd / kdcore_dkd as packages, not as registered plugins."""
    reg = load_registry(env={"KDCORE_PLUGINS": "tand"})
    assert "tand" in reg.available("loss") and "nkd" not in reg.available("loss") and not reg.failed
    assert reg.create("loss", "tand", alpha=2.0, beta=0.5, gamma=0.5).gamma == 0.5


@pytest.mark.parametrize("params,name", [
    ({"alpha": -1.0}, "alpha"),
    ({"beta": "2"}, "beta"),
    ({"gamma": -0.1}, "gamma"),
    ({"temperature": 0}, "temperature"),
    ({"chunk_size": -4}, "chunk_size"),
    ({"delta": 0.1}, "delta"),
    ({"divergence": {"name": "kl", "power": 2}}, "divergence"),
    ({"tckd_divergence": {"name": "kl", "x": 1}}, "tckd_divergence"),
    ({"nckd_divergence": {"alpha": 1.0}}, "nckd_divergence"),
    ({"nkd_divergence": {"name": "rkl", "y": 0}}, "nkd_divergence"),
    ({"nkd_divergence": 7}, "nkd_divergence"),
])
def test_bad_parameters_name_the_parameter(params, name):
    with pytest.raises(kdcore.ConfigError) as err:
        kdcore.create("loss", "tand", **params)
    assert str(err.value).startswith(name)


def test_unknown_divergence_name():
    with pytest.raises(kdcore.UnknownComponentError, match="hellinger"):
        kdcore.create("loss", "tand", divergence="hellinger")
