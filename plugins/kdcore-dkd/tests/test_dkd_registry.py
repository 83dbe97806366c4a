"""Registration of ``dkd`` and parameter validation; the DKD recipe's warm-up."""

import pytest
import torch

import kdcore
from kdcore.losses.schedule import Progress
from kdcore.plugins import load_registry


def test_registered_by_this_plugin():
    from kdcore.plugins import default_registry

    reg = default_registry()
    assert reg.get("loss", "dkd").plugin == "dkd"
    registered = {(c.kind, c.name) for p in reg.plugins if p.name == "dkd" for c in p.components}
    assert registered == {("loss", "dkd")}


def test_loads_alone():
    reg = load_registry(env={"KDCORE_PLUGINS": "dkd"})
    assert "dkd" in reg.available("loss") and not reg.failed
    assert reg.create("loss", "dkd", beta=2.0).beta == 2.0


@pytest.mark.parametrize("params,name", [
    ({"alpha": -1.0}, "alpha"),
    ({"beta": "8"}, "beta"),
    ({"temperature": 0.0}, "temperature"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"gamma": 1.0}, "gamma"),
    ({"divergence": {"name": "kl", "power": 2}}, "divergence"),
    ({"tckd_divergence": {"alpha": 1.0}}, "tckd_divergence"),
    ({"nckd_divergence": {"name": "rkl", "x": 1}}, "nckd_divergence"),
    ({"nckd_divergence": 3}, "nckd_divergence"),
])
def test_bad_parameters_name_the_parameter(params, name):
    with pytest.raises(kdcore.ConfigError) as err:
        kdcore.create("loss", "dkd", **params)
    assert str(err.value).startswith(name)


def test_unknown_divergence_name():
    with pytest.raises(kdcore.UnknownComponentError, match="rkll"):
        kdcore.create("loss", "dkd", divergence="rkll")


def test_warmup_of_the_recipe_runs_with_kdcore_and_dkd_alone():
    """The DKD recipe's warm-up is the core's ``warmup``: min(epoch / 20, 1)."""
    reg = load_registry(env={"KDCORE_PLUGINS": "dkd"})
    warm = reg.create("scheduler", "warmup")
    at = [warm(Progress(epoch=e, step=(e - 1) * 10 + 3, epochs=240, steps_per_epoch=10)) for e in (1, 2, 19, 20, 21, 240)]
    assert at == [1 / 20, 2 / 20, 19 / 20, 1.0, 1.0, 1.0]
