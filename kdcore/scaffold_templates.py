"""The files ``kdcore new-plugin`` writes (:mod:`kdcore.scaffold`), one sample component per kind.

Placeholders, replaced as plain text: ``__NAME__`` (the entry-point and
component name), ``__DIST__`` (the distribution, ``kdcore-NAME``),
``__MODULE__`` (the package, ``kdcore_NAME``), ``__CLASS__`` (the sample
class), ``__KIND__``, ``__HOOK__`` (the registration hook) and
``__KDCORE__`` (the kdcore version the package asks for at least).
"""

from __future__ import annotations

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "__DIST__"
version = "0.1.0"
description = "kdcore plugin: the __KIND__ __NAME__"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["kdcore>=__KDCORE__"]

[project.optional-dependencies]
test = ["kdcore[test]>=__KDCORE__"]

# kdcore finds the plugin through this entry point (group "kdcore")
[project.entry-points.kdcore]
__NAME__ = "__MODULE__"

[tool.setuptools.packages.find]
include = ["__MODULE__*"]

[tool.pytest.ini_options]
testpaths = ["tests"]
addopts = "-p kdcore.testing.pytest_plugin --import-mode=importlib -p no:cacheprovider"
# the plugins whose components the kdcore_component fixture runs over
kdcore_plugins = "__NAME__"
'''

README = '''\
# __DIST__

A kdcore plugin that registers the __KIND__ `__NAME__` (`__MODULE__.__CLASS__`).

## Install and test

The tests need the plugin **installed** (they check that kdcore finds it
through its entry point), with the test tools of `kdcore[test]`:

```
pip install -e ".[test]"
pytest
```

`kdcore plugins` then lists `__NAME__` and `kdcore list __KIND__` shows
`__NAME__`. After editing the code of an editable install nothing needs
reinstalling; after editing `pyproject.toml` (the entry point), reinstall.

## Layout

- `pyproject.toml`: the distribution and its entry point,
  `[project.entry-points.kdcore] __NAME__ = "__MODULE__"`;
- `__MODULE__/__init__.py`: the component and the `@kdcore.hookimpl`
  `__HOOK__` that registers it;
- `tests/test_discovery.py`: the plugin is found through its entry point and
  its components pass `kdcore.testing`'s checks;
- `tests/test___NAME__.py`: the component against a float64 reference.
'''

DISCOVERY_TEST = '''\
"""The plugin is found the way kdcore loads plugins (its entry point), not only
importable, and its components follow the conventions of their kind.
Needs the plugin installed: ``pip install -e ".[test]"``."""

import importlib.metadata as md
import re

import kdcore
from kdcore.plugins import load_registry
from kdcore.testing import check_component


def _normalised(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_entry_point_is_installed():
    found = {ep.name: ep for ep in md.entry_points(group="kdcore")}
    assert "__NAME__" in found, 'not installed: run pip install -e ".[test]" in this directory'
    assert found["__NAME__"].value == "__MODULE__"
    assert _normalised(found["__NAME__"].dist.metadata["Name"]) == "__DIST__"


def test_kdcore_registers_the_component_from_this_plugin():
    registry = load_registry()
    assert not [f.reason for f in registry.failed if f.name == "__NAME__"]
    assert "__NAME__" in registry.available("__KIND__")
    assert registry.get("__KIND__", "__NAME__").plugin == "__NAME__"
    assert "__NAME__" in kdcore.available("__KIND__")


def test_component_follows_the_conventions_of_its_kind(kdcore_component):
    """Run once per component of this plugin (the ini option kdcore_plugins)."""
    check_component(*kdcore_component)
'''

LOSS = '''\
"""__DIST__: registers the loss ``__NAME__``.

A weighted symmetric KD (Hinton et al. 2015 with the reverse KL added):
``T^2 * ((1 - w) KL(p_t || p_s) + w KL(p_s || p_t))`` per row, with
``p = softmax(z / T)``.
"""

import kdcore
from kdcore import params
from kdcore.functional import kl_rows, log_softmax_t


class __CLASS__(kdcore.LogitLoss):
    """``__NAME__``: ``temperature`` T, ``reverse`` w in [0, 1] (0: forward KD)."""

    def __init__(self, *, temperature: float = 4.0, reverse: float = 0.5, transforms=None, chunk_size=None):
        super().__init__(temperature=temperature, transforms=transforms, chunk_size=chunk_size)
        self.reverse = params.in_range("reverse", reverse, 0.0, 1.0, closed_high=True)

    def rows(self, student, teacher, target):
        t, w = self.temperature, self.reverse
        p, q = log_softmax_t(teacher, t), log_softmax_t(student, t)
        return t * t * ((1 - w) * kl_rows(p, q) + w * kl_rows(q, p))


@kdcore.hookimpl
def register_losses(register):
    register("__NAME__", __CLASS__)
'''

LOSS_TEST = '''\
"""``__NAME__`` against a float64 reference written from its equation."""

import pytest
import torch
from hypothesis import given, settings

import kdcore
from kdcore.testing import assert_finite_with_grads, extreme_batches, random_logits, random_targets


def reference(zs, zt, t, w):
    """T^2 ((1 - w) KL(p || q) + w KL(q || p)) per row, in float64."""
    p, q = torch.softmax(zt.double() / t, -1), torch.softmax(zs.double() / t, -1)
    kl_pq = (p * (p.log() - q.log())).sum(-1)
    kl_qp = (q * (q.log() - p.log())).sum(-1)
    return t * t * ((1 - w) * kl_pq + w * kl_qp)


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_value_equals_the_reference(w):
    zs, zt = random_logits(8, 5, seed=1), random_logits(8, 5, seed=2)
    loss = kdcore.create("loss", "__NAME__", temperature=2.0, reverse=w)
    torch.testing.assert_close(loss(zs, zt).double(), reference(zs, zt, 2.0, w).mean(), rtol=1e-5, atol=1e-6)


def test_token_level_with_ignored_positions():
    zs, zt = random_logits(2, 6, 5, seed=3), random_logits(2, 6, 5, seed=4)
    y = random_targets(2, 6, classes=5, seed=5, ignore_frac=0.4)
    y[0, 0] = 1
    kept = y != -100
    loss = kdcore.create("loss", "__NAME__")
    torch.testing.assert_close(loss(zs, zt, y).double(), reference(zs[kept], zt[kept], 4.0, 0.5).mean(),
                               rtol=1e-5, atol=1e-6)


def test_an_invalid_parameter_names_itself():
    with pytest.raises(kdcore.ConfigError, match="reverse"):
        kdcore.create("loss", "__NAME__", reverse=2.0)


@settings(max_examples=30, deadline=None)
@given(batch=extreme_batches())
def test_finite_on_extreme_inputs(batch):
    assert_finite_with_grads(kdcore.create("loss", "__NAME__"), *batch)
'''

DIVERGENCE = '''\
"""__DIST__: registers the divergence ``__NAME__``.

The squared Hellinger distance ``H^2(p, q) = 1 - sum_k sqrt(p_k q_k)``, from
log-probabilities: ``1 - exp(logsumexp((log p + log q) / 2))``, exact where a
probability is 0 (``-inf``).
"""

import torch

import kdcore
from kdcore import params


class __CLASS__:
    """``__NAME__``: ``div(teacher_logp, student_logp) -> [N]``; ``scale`` multiplies it."""

    def __init__(self, *, scale: float = 1.0):
        self.scale = params.positive("scale", scale)

    def __call__(self, teacher_logp, student_logp):
        overlap = torch.logsumexp(0.5 * (teacher_logp + student_logp), dim=-1)
        return self.scale * -torch.expm1(overlap).clamp(max=0.0)


@kdcore.hookimpl
def register_divergences(register):
    register("__NAME__", __CLASS__)
'''

DIVERGENCE_TEST = '''\
"""``__NAME__`` against a float64 reference written from its equation."""

import torch

import kdcore
from kdcore.testing import random_logits


def reference(p_logp, q_logp):
    p, q = p_logp.double().exp(), q_logp.double().exp()
    return 1 - (p * q).sqrt().sum(-1)


def test_value_equals_the_reference():
    p = torch.log_softmax(random_logits(6, 5, seed=1), -1)
    q = torch.log_softmax(random_logits(6, 5, seed=2), -1)
    div = kdcore.create("divergence", "__NAME__")
    torch.testing.assert_close(div(p, q).double(), reference(p, q), rtol=1e-5, atol=1e-6)


def test_disjoint_supports_give_one():
    p = torch.log(torch.tensor([[1.0, 0.0]]))
    q = torch.log(torch.tensor([[0.0, 1.0]]))
    assert kdcore.create("divergence", "__NAME__")(p, q).item() == 1.0


def test_through_kd_as_any_divergence():
    zs, zt = random_logits(4, 5, seed=3), random_logits(4, 5, seed=4)
    loss = kdcore.create("loss", "kd", temperature=1.0, divergence="__NAME__")
    expected = reference(torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)).mean()
    torch.testing.assert_close(loss(zs, zt).double(), expected, rtol=1e-5, atol=1e-6)
'''

TRANSFORM = '''\
"""__DIST__: registers the soft-label transform ``__NAME__``.

Sharpening (``power > 1``) or flattening (``power < 1``) of the teacher's
distribution: ``p'_k = p_k^a / sum_j p_j^a``, i.e. ``log_softmax(a log p)``,
which keeps ``-inf`` (padding) columns at ``-inf``.
"""

import torch

import kdcore
from kdcore import params


class __CLASS__:
    """``__NAME__``: ``transform(teacher_logp, target) -> logp``, exponent ``power`` > 0."""

    def __init__(self, *, power: float = 2.0):
        self.power = params.positive("power", power)

    def __call__(self, teacher_logp, target):
        return torch.log_softmax(self.power * teacher_logp, dim=-1)


@kdcore.hookimpl
def register_transforms(register):
    register("__NAME__", __CLASS__)
'''

TRANSFORM_TEST = '''\
"""``__NAME__`` against a float64 reference written from its equation."""

import torch

import kdcore
from kdcore.testing import random_logits


def reference(logp, a):
    p = logp.double().exp() ** a
    return (p / p.sum(-1, keepdim=True)).log()


def test_value_equals_the_reference():
    logp = torch.log_softmax(random_logits(5, 6, seed=1), -1)
    out = kdcore.create("transform", "__NAME__", power=3.0)(logp, None)
    torch.testing.assert_close(out.double(), reference(logp, 3.0), rtol=1e-5, atol=1e-6)


def test_power_one_is_the_identity():
    logp = torch.log_softmax(random_logits(5, 6, seed=2), -1)
    torch.testing.assert_close(kdcore.create("transform", "__NAME__", power=1.0)(logp, None), logp)


def test_in_a_loss_chain():
    zs, zt = random_logits(4, 6, seed=3), random_logits(4, 6, seed=4)
    loss = kdcore.create("loss", "kd", temperature=1.0, transforms=[{"name": "__NAME__", "power": 2.0}])
    p = reference(torch.log_softmax(zt, -1), 2.0).exp()
    expected = (p * (p.log() - torch.log_softmax(zs.double(), -1))).sum(-1).mean()
    torch.testing.assert_close(loss(zs, zt).double(), expected, rtol=1e-5, atol=1e-6)
'''

SCHEDULER = '''\
"""__DIST__: registers the time schedule ``__NAME__``.

An exponential ramp of a loss term's weight over the run: with ``f`` the
fraction of the run done (step by step), ``1 - exp(-rate * f)``, normalised
to reach 1 at the end: ``(1 - exp(-rate f)) / (1 - exp(-rate))``.
"""

import math

import kdcore
from kdcore import params
from kdcore.schedule import Progress, TimeSchedule


class __CLASS__(TimeSchedule):
    """``__NAME__``: ``schedule(progress) -> multiplier`` of the term's ``weight``; ``rate`` > 0."""

    def __init__(self, rate: float = 5.0):
        self.rate = params.positive("rate", rate)

    def __call__(self, progress: Progress) -> float:
        return -math.expm1(-self.rate * progress.fraction) / -math.expm1(-self.rate)


@kdcore.hookimpl
def register_schedulers(register):
    register("__NAME__", __CLASS__)
'''

SCHEDULER_TEST = '''\
"""``__NAME__`` against its equation at chosen points of a run."""

import math

import pytest

import kdcore
from kdcore.schedule import Progress


def at(step, epochs=4, steps_per_epoch=10):
    return Progress(epoch=step // steps_per_epoch + 1, step=step, epochs=epochs, steps_per_epoch=steps_per_epoch)


@pytest.mark.parametrize("step", [0, 7, 20, 39])
def test_value_equals_the_equation(step):
    schedule = kdcore.create("scheduler", "__NAME__", rate=3.0)
    f = step / 40
    assert schedule(at(step)) == pytest.approx((1 - math.exp(-3.0 * f)) / (1 - math.exp(-3.0)), rel=1e-12)


def test_starts_at_zero_and_increases():
    schedule = kdcore.create("scheduler", "__NAME__")
    values = [schedule(at(s)) for s in range(40)]
    assert values[0] == 0.0 and all(a < b for a, b in zip(values, values[1:])) and values[-1] < 1.0
'''

BACKBONE = '''\
"""__DIST__: registers the backbone ``__NAME__``.

A residual MLP classifier: ``x -> Linear -> (x + Linear(GELU(LayerNorm(x)))) x depth -> Linear``.
"""

from torch import nn

import kdcore
from kdcore import params


class __CLASS__(nn.Module):
    """``__NAME__``: ``factory(num_classes=K, in_features=D, width=64, depth=2)`` (the engine
    fills ``in_features`` from the dataset's input shape)."""

    def __init__(self, num_classes: int, in_features: int, width: int = 64, depth: int = 2):
        super().__init__()
        params.positive_int("num_classes", num_classes)
        params.positive_int("in_features", in_features)
        width = params.positive_int("width", width)
        depth = params.positive_int("depth", depth)
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()) for _ in range(depth))
        self.head = nn.Linear(width, num_classes)
        # the modules feature losses read by default (kdcore.testing checks they exist)
        self.feature_taps = {"stages": [f"blocks.{i}" for i in range(depth)], "pooled": f"blocks.{depth - 1}"}

    def forward(self, x):
        h = self.stem(x.flatten(1))
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


@kdcore.hookimpl
def register_backbones(register):
    register("__NAME__", __CLASS__)
'''

BACKBONE_TEST = '''\
"""``__NAME__`` computes what its docstring says."""

import pytest
import torch

import kdcore


def test_forward_equals_the_layers_by_hand():
    torch.manual_seed(0)
    model = kdcore.create("backbone", "__NAME__", num_classes=3, in_features=4, width=8, depth=1).eval()
    x = torch.randn(5, 4)
    h = model.stem(x)
    ln, lin = model.blocks[0][0], model.blocks[0][1]
    h = h + torch.nn.functional.gelu(lin(ln(h)))
    torch.testing.assert_close(model(x), model.head(h))


def test_an_invalid_width_names_itself():
    with pytest.raises(kdcore.ConfigError, match="width"):
        kdcore.create("backbone", "__NAME__", num_classes=3, in_features=4, width=0)
'''

DATASET = '''\
"""__DIST__: registers the dataset ``__NAME__``.

Gaussian blobs: ``num_classes`` centres drawn from ``N(0, I)`` in ``dim``
dimensions, samples ``x = centre_y + spread * N(0, I)`` with uniform labels, a
seeded split into train / val / test. Held in memory (no files, no download).
"""

import torch

import kdcore
from kdcore import params
from kdcore.data import DataSplits, TensorSplit


def gaussian_blobs(num_classes: int = 3, dim: int = 8, n: int = 600, spread: float = 0.5,
             split: tuple = (0.8, 0.1, 0.1), seed: int = 0) -> DataSplits:
    """``__NAME__``: ``factory(**params) -> kdcore.data.DataSplits``."""
    num_classes = params.positive_int("num_classes", num_classes)
    dim = params.positive_int("dim", dim)
    n = params.positive_int("n", n)
    spread = params.positive("spread", spread)
    if len(split) != 3 or abs(sum(split) - 1.0) > 1e-9 or min(split) < 0:
        raise kdcore.ConfigError(f"split: three non-negative fractions summing to 1, got {list(split)!r}")
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = centres[y] + spread * torch.randn(n, dim, generator=g)
    n_train, n_val = int(split[0] * n), int(split[1] * n)
    parts = [slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, n)]
    train, val, test = (TensorSplit(x[s], y[s]) if s.stop > s.start else None for s in parts)
    return DataSplits(train, val, test, num_classes=num_classes, input_shape=(dim,),
                      meta={"centres": centres.tolist()})
'''

DATASET_REGISTER = '''

@kdcore.hookimpl
def register_datasets(register):
    register("__NAME__", gaussian_blobs)
'''

DATASET_TEST = '''\
"""``__NAME__`` holds what its docstring says."""

import pytest
import torch

import kdcore


def test_samples_lie_around_their_class_centre():
    data = kdcore.create("dataset", "__NAME__", n=300, spread=0.1, seed=1)
    centres = torch.tensor(data.meta["centres"])
    x, y = data.train.inputs, data.train.targets
    nearest = torch.cdist(x, centres).argmin(-1)
    assert (nearest == y).float().mean() > 0.95
    assert len(data.train) + len(data.val) + len(data.test) == 300


def test_an_invalid_split_names_itself():
    with pytest.raises(kdcore.ConfigError, match="split"):
        kdcore.create("dataset", "__NAME__", split=[0.5, 0.5, 0.5])
'''

#: kind -> (registration hook, the sample's name (``__CAMEL__``: the name in CamelCase),
#: the package's ``__init__.py``, the kind's own test)
KINDS = {
    "loss": ("register_losses", "__CAMEL__Loss", LOSS, LOSS_TEST),
    "divergence": ("register_divergences", "__CAMEL__Divergence", DIVERGENCE, DIVERGENCE_TEST),
    "transform": ("register_transforms", "__CAMEL__Transform", TRANSFORM, TRANSFORM_TEST),
    "scheduler": ("register_schedulers", "__CAMEL__Schedule", SCHEDULER, SCHEDULER_TEST),
    "backbone": ("register_backbones", "__CAMEL__Net", BACKBONE, BACKBONE_TEST),
    "dataset": ("register_datasets", "gaussian_blobs", DATASET + DATASET_REGISTER, DATASET_TEST),
}
