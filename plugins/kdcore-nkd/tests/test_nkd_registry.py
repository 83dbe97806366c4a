"""Registration of ``nkd`` and parameter validation."""

import pytest

import kdcore
from kdcore.plugins import default_registry, load_registry


def test_registered_by_this_plugin():
    assert default_registry().get("loss", "nkd").plugin == "nkd"


def test_loads_alone():
    reg = load_registry(env={"KDCORE_PLUGINS": "nkd"})
    assert "nkd" in reg.available("loss") and not reg.failed
    assert reg.create("loss", "nkd", gamma=0.5).gamma == 0.5


@pytest.mark.parametrize("params,name", [
    ({"gamma": -1.0}, "gamma"),
    ({"gamma": None}, "gamma"),
    ({"temperature": -2.0}, "temperature"),
    ({"chunk_size": 1.5}, "chunk_size"),
    ({"alpha": 1.0}, "alpha"),
    ({"divergence": {"name": "kl", "power": 2}}, "divergence"),
    ({"divergence": {"alpha": 1.0}}, "divergence"),
    ({"divergence": 1.0}, "divergence"),
])
def test_bad_parameters_name_the_parameter(params, name):
    with pytest.raises(kdcore.ConfigError) as err:
        kdcore.create("loss", "nkd", **params)
    assert str(err.value).startswith(name)


def test_unknown_divergence_name():
    with pytest.raises(kdcore.UnknownComponentError, match="klx"):
        kdcore.create("loss", "nkd", divergence="klx")
