"""An unlabelled transfer set: ``gaussian_mixture(unlabelled=N)`` and ``[[loss]] rows = "all"``.

``ce`` must ignore the unlabelled rows (target -100) while a teacher term with
``rows = "all"`` averages over every row; checked against plain float64
formulas written here from the definitions (methods.md: kd is
``T^2 KL(p_T || q_T)`` per row, the mean over the rows it sees).
"""

from __future__ import annotations

import json

import pytest
import torch

from kdcore.common.errors import ConfigError
from kdcore.config import from_dict, to_dict
from kdcore.engine import train
from kdcore.engine.objective import Objective
from kdcore.losses.outputs import Outputs
from kdcore.plugins import default_registry


def _config(rows="all", accumulate=1, loss="kd", checkpoint="t.pt"):
    return {
        "run": {"seed": 0, "epochs": 1, "batch_size": 16, "progress": "off", "accumulate": accumulate},
        "data": {"name": "gaussian_mixture", "n": 400, "train_size": 200, "unlabelled": 150},
        "teacher": {"backbone": "mlp", "hidden": [16], "checkpoint": checkpoint},
        "student": {"backbone": "mlp", "hidden": [8]},
        "optim": {"name": "adamw", "lr": 1e-3},
        "loss": [{"name": "ce"}, {"name": loss, "temperature": 2.0, "rows": rows}],
    }


def test_unlabelled_rows_are_the_last_of_the_kept_training_samples():
    reg = default_registry()
    full = reg.create("dataset", "gaussian_mixture", n=400)
    data = reg.create("dataset", "gaussian_mixture", n=400, train_size=200, unlabelled=150)
    assert len(data.train) == 200
    assert torch.equal(data.train.inputs, full.train.inputs[:200])
    assert torch.equal(data.train.targets[:50], full.train.targets[:50])
    assert (data.train.targets[50:] == -100).all()
    assert torch.equal(data.train.posterior, full.train.posterior[:200])
    assert torch.equal(data.test.targets, full.test.targets)  # evaluation splits keep their labels
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="^unlabelled: must be a non-negative integer"):
            reg.create("dataset", "gaussian_mixture", n=400, unlabelled=bad)
    with pytest.raises(ConfigError, match="^unlabelled: 200 leaves none"):
        reg.create("dataset", "gaussian_mixture", n=400, train_size=200, unlabelled=200)


def _ce64(s, y):
    keep = y != -100
    logp = torch.log_softmax(s.double(), -1)
    return -logp[keep].gather(1, y[keep, None]).mean()


def _kd64(s, t, temp):
    p = torch.softmax(t.double() / temp, -1)
    logq = torch.log_softmax(s.double() / temp, -1)
    return temp ** 2 * (p * (p.log() - logq)).sum(-1).mean()


@pytest.mark.parametrize("shape", [(40,), (4, 10)])
def test_ce_ignores_unlabelled_rows_and_an_all_rows_term_uses_them(shape):
    objective = Objective.from_config(from_dict(_config()), default_registry())
    ce, kd = objective.terms
    assert (ce.rows, kd.rows) == ("labelled", "all")
    g = torch.Generator().manual_seed(0)
    s = torch.randn(*shape, 5, generator=g) * 3
    t = torch.randn(*shape, 5, generator=g) * 3
    y = torch.randint(0, 5, shape, generator=g).masked_fill(torch.rand(shape, generator=g) < 0.6, -100)
    assert (y == -100).any() and (y != -100).any()
    flat = (s.reshape(-1, 5), t.reshape(-1, 5), y.reshape(-1))
    values = objective.losses(Outputs(logits=s), Outputs(logits=t), y, {"ce": 1.0, "kd": 1.0})
    torch.testing.assert_close(values["ce"].double(), _ce64(flat[0], flat[2]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values["kd"].double(), _kd64(flat[0], flat[1], 2.0), rtol=1e-5, atol=1e-6)
    labelled = Objective.from_config(from_dict(_config(rows="labelled")), default_registry())
    keep = flat[2] != -100
    kd_labelled = labelled.losses(Outputs(logits=s), Outputs(logits=t), y, {"ce": 1.0, "kd": 1.0})["kd"]
    torch.testing.assert_close(kd_labelled.double(), _kd64(flat[0][keep], flat[1][keep], 2.0),
                               rtol=1e-5, atol=1e-6)


def test_rows_key_errors():
    with pytest.raises(ConfigError, match=r"^loss\[1\]\.rows: must be 'labelled' or 'all'"):
        from_dict(_config(rows="every"))
    reg = default_registry()
    conf = _config()
    conf["loss"][0]["rows"] = "all"
    with pytest.raises(ConfigError, match=r"^loss\[0\]\.rows: 'all' is for a loss that uses the teacher"):
        Objective.from_config(from_dict(conf), reg)
    with pytest.raises(ConfigError, match=r"^loss\[1\]\.rows: 'all' needs run.accumulate = 1"):
        Objective.from_config(from_dict(_config(accumulate=2)), reg)
    with pytest.raises(ConfigError, match=r"^loss\[1\]\.rows: 'all' needs run.accumulate = 1"):
        Objective.from_config(from_dict(_config()), reg, world=2)
    assert to_dict(from_dict(_config()))["loss"][1]["rows"] == "all"
    assert "rows" not in to_dict(from_dict(_config()))["loss"][0]


def test_a_student_distils_on_the_transfer_set(tmp_path):
    """A run trains on the transfer set; the unlabelled rows change what the student learns."""
    teacher = {"run": {"seed": 0, "epochs": 1, "batch_size": 32, "progress": "off"},
               "data": {"name": "gaussian_mixture", "n": 400},
               "student": {"backbone": "mlp", "hidden": [16]},
               "optim": {"name": "adamw", "lr": 3e-3}, "loss": [{"name": "ce"}]}
    train(teacher, tmp_path / "t", quiet=True)
    ckpt = str(tmp_path / "t" / "checkpoints" / "best.pt")
    runs = {rows: train(_config(rows=rows, checkpoint=ckpt), tmp_path / rows, quiet=True) for rows in ("all", "labelled")}
    assert runs["all"]["test_tv"] != runs["labelled"]["test_tv"]
    logged = json.loads((tmp_path / "all" / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["loss/kd"] > 0.0 and logged["loss/ce"] > 0.0
