"""The built-in divergences, transforms, schedules, backbone and dataset, and a
registry-parametrised check that every built-in component can be created with its
defaults and follows its kind's call convention.

References are written here in float64 from the definitions (methods.md and the
components' docstrings), never through ``kdcore.losses.functional``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kdcore
from kdcore.data import DataSplits, TensorSplit
from kdcore.losses.schedule import Progress
from kdcore.plugins import BUILTIN, default_registry
from kdcore.testing import random_logits, random_targets

NEG_INF = float("-inf")


def ref_log_softmax(z: torch.Tensor) -> torch.Tensor:
    """float64 log-softmax over the last dim, written out with a max shift."""
    z = z.double()
    m = z.max(dim=-1, keepdim=True).values
    return z - m - torch.log(torch.exp(z - m).sum(dim=-1, keepdim=True))


def logsumexp64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    m = x.max(dim=-1, keepdim=True).values
    return (m + torch.log(torch.exp(x - m).sum(dim=-1, keepdim=True))).squeeze(-1)


def random_logp(shape, seed, scale=3.0):
    return torch.log_softmax(random_logits(*shape, seed=seed, scale=scale), dim=-1)


def assert_config_error(key: str, kind: str, name: str, **params):
    with pytest.raises(kdcore.ConfigError) as info:
        kdcore.create(kind, name, **params)
    assert str(info.value).startswith(f"{key}:"), str(info.value)


# ----------------------------------------------------------------- divergences

def ref_kl_loop(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """``sum_k p_k log(p_k / q_k)`` per row, with an explicit loop; ``0 log 0 = 0``."""
    p64, q64 = p_logp.double().reshape(-1, p_logp.shape[-1]), q_logp.double().reshape(-1, p_logp.shape[-1])
    out = torch.zeros(p64.shape[0], dtype=torch.float64)
    for i in range(p64.shape[0]):
        for k in range(p64.shape[1]):
            pk = math.exp(p64[i, k].item())
            if pk > 0:
                out[i] += pk * (p64[i, k].item() - q64[i, k].item())
    return out.reshape(p_logp.shape[:-1])


@pytest.mark.parametrize("shape", [(6, 9), (2, 3, 5)])
@pytest.mark.parametrize("scale", [1.0, 5.0, 50.0])
def test_divergences_per_row(shape, scale):
    t, s = random_logp(shape, 1, scale), random_logp(shape, 2, scale)
    kl = kdcore.create("divergence", "kl")(t, s)
    rkl = kdcore.create("divergence", "rkl")(t, s)
    assert kl.shape == shape[:-1] and rkl.shape == shape[:-1]
    torch.testing.assert_close(kl.double(), ref_kl_loop(t, s), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rkl.double(), ref_kl_loop(s, t), rtol=1e-5, atol=1e-6)
    assert (kl - rkl).abs().max() > 1e-3  # the two directions differ on these inputs


@pytest.mark.parametrize("name", ["kl", "rkl"])
def test_divergence_shared_padded_columns(name):
    """-inf log-probabilities in the same columns of both: finite values and
    gradients, equal to the divergence on the other columns, zero padded grads."""
    t = random_logp((5, 8), 3).clone()
    s = random_logp((5, 8), 4).clone()
    t[:, -2:], s[:, -2:] = NEG_INF, NEG_INF
    t = t - torch.logsumexp(t, -1, keepdim=True)
    s = s - torch.logsumexp(s, -1, keepdim=True)
    t.requires_grad_(True)
    s.requires_grad_(True)
    value = kdcore.create("divergence", name)(t, s)
    value.sum().backward()
    assert torch.isfinite(value).all()
    assert torch.isfinite(t.grad).all() and torch.isfinite(s.grad).all()
    assert torch.all(t.grad[:, -2:] == 0) and torch.all(s.grad[:, -2:] == 0)
    a, b = (t, s) if name == "kl" else (s, t)
    torch.testing.assert_close(value.double(), ref_kl_loop(a[:, :-2].detach(), b[:, :-2].detach()),
                               rtol=1e-5, atol=1e-6)


def test_kl_with_underflowing_teacher_probabilities():
    """Teacher log-probs of -1e4 (p = 0 in float32 and float64): those terms are 0."""
    t = ref_log_softmax(torch.tensor([[0.0, -1e4, -1e4, 2.0], [1e4, 0.0, 0.0, 0.0]])).float()
    s = random_logp((2, 4), 5)
    value = kdcore.create("divergence", "kl")(t, s)
    torch.testing.assert_close(value.double(), ref_kl_loop(t, s), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["kl", "rkl"])
def test_divergence_of_equal_inputs_is_zero_and_nonnegative(name):
    div = kdcore.create("divergence", name)
    p = random_logp((7, 6), 6)
    assert torch.all(div(p, p) == 0)
    assert torch.all(div(p, random_logp((7, 6), 7)) > 0)


@pytest.mark.parametrize("name", ["kl", "rkl"])
def test_divergence_rejects_parameters(name):
    assert_config_error("alpha", "divergence", name, alpha=1.0)


# ----------------------------------------------------------------- transforms

@pytest.mark.parametrize("temperature", [0.5, 2.0, 5.0])
def test_temperature_transform(temperature):
    z = random_logits(6, 7, seed=8, scale=4.0)
    logp = torch.log_softmax(z, -1)
    out = kdcore.create("transform", "temperature", temperature=temperature)(logp, None)
    assert out.shape == logp.shape
    torch.testing.assert_close(out.double(), ref_log_softmax(z.double() / temperature), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logsumexp64(out), torch.zeros(6, dtype=torch.float64), atol=1e-6, rtol=0)


def test_temperature_transform_identity_and_default():
    logp = random_logp((4, 5), 9)
    out = kdcore.create("transform", "temperature", temperature=1.0)(logp, None)
    torch.testing.assert_close(out, logp, rtol=1e-6, atol=1e-6)
    assert kdcore.create("transform", "temperature").temperature == 2.0


def test_temperature_transform_exact_for_underflowing_probabilities():
    """p = exp(-300), exp(-6000) underflow to 0 in float32; softened by T=100 they
    are e^-3, e^-60 relative to the top class, and the log-space result is exact."""
    logp = ref_log_softmax(torch.tensor([[0.0, -300.0, -6000.0, -1.0]])).float()
    out = kdcore.create("transform", "temperature", temperature=100.0)(logp)
    assert torch.isfinite(out).all()
    expected = ref_log_softmax(logp.double() / 100.0)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


def ref_label_smoothing(logp: torch.Tensor, delta: float) -> torch.Tensor:
    """``log((1 - delta) p + delta / C)`` per entry, with an explicit loop in float64."""
    lp = logp.double()
    c = lp.shape[-1]
    out = torch.empty_like(lp)
    for idx in range(lp.numel()):
        i, k = divmod(idx, c)
        out[i, k] = math.log((1 - delta) * math.exp(lp[i, k].item()) + delta / c)
    return out


@pytest.mark.parametrize("delta", [0.05, 0.1, 0.5, 0.9])
def test_label_smoothing_transform(delta):
    logp = random_logp((5, 6), 10)
    target = torch.arange(5) % 6
    out = kdcore.create("transform", "label_smoothing", delta=delta)(logp, target)
    torch.testing.assert_close(out.double(), ref_label_smoothing(logp, delta), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logsumexp64(out), torch.zeros(5, dtype=torch.float64), atol=1e-6, rtol=0)


def test_label_smoothing_delta_zero_is_identity():
    logp = random_logp((5, 6), 11)
    assert torch.equal(kdcore.create("transform", "label_smoothing", delta=0.0)(logp, None), logp)
    assert kdcore.create("transform", "label_smoothing").delta == 0.1


def test_label_smoothing_exact_for_underflowing_probabilities():
    """Entries with log p = -120 (p ~ 8e-53 underflows in float32) mixed with
    delta / C of the same order: the result is log(p (1 - delta) + delta / C),
    about -120 + log 2, which only a log-space evaluation gets in float32."""
    c = 3
    delta = c * math.exp(-120.0)
    logp = torch.tensor([[0.0, -120.0, -120.0]])
    logp = (logp - logsumexp64(logp).unsqueeze(-1)).float()
    out = kdcore.create("transform", "label_smoothing", delta=delta)(logp)
    expected = ref_label_smoothing(logp, delta)
    assert abs(expected[0, 1].item() - (-120.0 + math.log(2.0))) < 1e-6
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)


def test_label_smoothing_keeps_padded_columns_out():
    """-inf teacher log-probs mark padded columns, which are not classes: they stay
    -inf and delta is spread over the C' real columns, log((1 - delta) p + delta / C')."""
    logp = random_logp((4, 5), 12)
    padded = torch.cat([logp, torch.full((4, 2), NEG_INF)], dim=-1)
    out = kdcore.create("transform", "label_smoothing", delta=0.2)(padded, None)
    assert torch.all(out[:, -2:] == NEG_INF)
    torch.testing.assert_close(out[:, :-2].double(), ref_label_smoothing(logp, 0.2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "key", "value"), [
    ("temperature", "temperature", 0.0), ("temperature", "temperature", -1.0),
    ("temperature", "temperature", "2"), ("label_smoothing", "delta", 1.0),
    ("label_smoothing", "delta", -0.1), ("label_smoothing", "delta", None),
    ("label_smoothing", "alpha", 0.1)])
def test_transform_bad_parameters(name, key, value):
    assert_config_error(key, "transform", name, **{key: value})


# ----------------------------------------------------------------- schedules

def progress(step, epochs=10, steps_per_epoch=5):
    return Progress(epoch=step // steps_per_epoch + 1, step=step, epochs=epochs,
                    steps_per_epoch=steps_per_epoch)


def test_fixed_schedule():
    assert kdcore.create("scheduler", "fixed")(progress(0)) == 1.0
    fixed = kdcore.create("scheduler", "fixed", value=0.25)
    assert [fixed(progress(s)) for s in (0, 7, 49)] == [0.25, 0.25, 0.25]


@pytest.mark.parametrize(("params", "expected"), [
    # 10 epochs x 5 steps = 50 steps: start + (end - start) * step / 50, end from step 50 on
    ({}, {0: 0.0, 10: 0.2, 25: 0.5, 49: 0.98, 50: 1.0, 80: 1.0}),
    ({"start": 1.0, "end": 0.2}, {0: 1.0, 25: 0.6, 50: 0.2}),
    # over the first 2 epochs (10 steps), then constant
    ({"start": 2.0, "end": 4.0, "epochs": 2}, {0: 2.0, 5: 3.0, 9: 3.8, 10: 4.0, 49: 4.0}),
])
def test_linear_schedule(params, expected):
    linear = kdcore.create("scheduler", "linear", **params)
    got = {step: linear(progress(step)) for step in expected}
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("name", "key", "value"), [
    ("fixed", "value", "1"), ("fixed", "value", True), ("linear", "start", None),
    ("linear", "end", "x"), ("linear", "epochs", 0), ("linear", "epochs", 1.5),
    ("linear", "steps", 3)])
def test_schedule_bad_parameters(name, key, value):
    assert_config_error(key, "scheduler", name, **{key: value})


# ----------------------------------------------------------------- mlp backbone

@pytest.mark.parametrize("hidden", [(), (16,), (16, 8)])
def test_mlp_shapes(hidden):
    model = kdcore.create("backbone", "mlp", num_classes=4, in_features=6, hidden=list(hidden))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    widths = [6, *hidden, 4]
    assert [(m.in_features, m.out_features) for m in linears] == list(zip(widths[:-1], widths[1:]))
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == len(hidden)
    assert model(torch.randn(5, 6)).shape == (5, 4)
    assert model(torch.randn(5, 2, 3)).shape == (5, 4)  # inputs are flattened


def test_mlp_defaults_and_dropout():
    model = kdcore.create("backbone", "mlp", num_classes=3)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(30, 128), (128, 128), (128, 3)]
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    dropped = kdcore.create("backbone", "mlp", num_classes=3, in_features=4, hidden=[8], dropout=0.5)
    assert sum(isinstance(m, nn.Dropout) for m in dropped.modules()) == 1
    x = torch.randn(3, 4)
    dropped.eval()
    torch.testing.assert_close(dropped(x), dropped(x))


@pytest.mark.parametrize(("key", "value"), [
    ("num_classes", 0), ("num_classes", 2.5), ("num_classes", True), ("num_classes", "3"),
    ("in_features", 0), ("in_features", -4), ("hidden", [0]), ("hidden", [8, -1]), ("hidden", [2.5]),
    ("hidden", "12"), ("hidden", 128), ("hidden", [True]), ("dropout", 1.0), ("dropout", -0.1),
    ("width", 3)])
def test_mlp_bad_parameters(key, value):
    params = {"num_classes": 3, key: value}
    assert_config_error(key, "backbone", "mlp", **params)


# ----------------------------------------------------------------- gaussian_mixture

def gm(**params):
    return kdcore.create("dataset", "gaussian_mixture", **params)


@pytest.mark.parametrize(("n", "split"), [(1000, (0.8, 0.1, 0.1)), (7, (0.5, 0.25, 0.25)),
                                          (100, (1.0, 0.0, 0.0)), (50, (0.6, 0.4, 0.0))])
def test_gaussian_mixture_sizes(n, split):
    data = gm(n=n, split=split, num_classes=4, dim=5)
    assert isinstance(data, DataSplits)
    assert data.num_classes == 4 and data.input_shape == (5,)
    sizes = [0 if part is None else len(part) for part in (data.train, data.val, data.test)]
    assert sum(sizes) == n
    assert sizes[0] == round(split[0] * n) and sizes[1] == round(split[1] * n)
    for part, frac in zip((data.train, data.val, data.test), split):
        if frac == 0:
            assert part is None
        else:
            assert isinstance(part, TensorSplit)
            assert part.inputs.shape == (len(part), 5) and part.targets.shape == (len(part),)
            assert part.posterior.shape == (len(part), 4)


def test_gaussian_mixture_is_deterministic_by_seed():
    a, b, c = gm(n=300, seed=5), gm(n=300, seed=5), gm(n=300, seed=6)
    for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets)
        assert torch.equal(x.posterior, y.posterior)
    assert torch.equal(a.meta["means"], b.meta["means"])
    assert not torch.equal(a.train.inputs, c.train.inputs)


def all_rows(data):
    parts = [p for p in (data.train, data.val, data.test) if p is not None]
    return (torch.cat([p.inputs for p in parts]), torch.cat([p.targets for p in parts]),
            torch.cat([p.posterior for p in parts]))


def test_gaussian_mixture_follows_its_definition():
    """Labels roughly uniform; means with entries in {-1, 0, 1}; x | y=k has mean mu_k
    and standard deviation sigma in every coordinate."""
    k, dim, sigma, n = 3, 8, 1.5, 6000
    data = gm(num_classes=k, dim=dim, sigma=sigma, n=n, seed=1)
    x, y, _ = all_rows(data)
    means = data.meta["means"]
    assert data.meta["sigma"] == sigma
    assert means.shape == (k, dim)
    assert set(means.unique().tolist()) <= {-1.0, 0.0, 1.0}
    counts = torch.bincount(y, minlength=k).double()
    sd = math.sqrt(n * (1 / k) * (1 - 1 / k))
    assert torch.all((counts - n / k).abs() < 5 * sd)
    for c in range(k):
        xc = x[y == c].double()
        assert (xc.mean(0) - means[c].double()).abs().max() < 0.2
        assert (xc.std(0) - sigma).abs().max() < 0.15


def ref_bayes_posterior(x, means, sigma):
    """p(y=k | x) = N(x; mu_k, sigma^2 I) (1/K) / sum_j N(x; mu_j, sigma^2 I) (1/K),
    from the Gaussian log-densities with an explicit loop over classes."""
    x, means = x.double(), means.double()
    d, k = x.shape[1], means.shape[0]
    log_joint = torch.empty(x.shape[0], k, dtype=torch.float64)
    for j in range(k):
        sq = ((x - means[j]) ** 2).sum(-1)
        log_density = -sq / (2 * sigma ** 2) - 0.5 * d * math.log(2 * math.pi * sigma ** 2)
        log_joint[:, j] = log_density + math.log(1.0 / k)
    return torch.exp(log_joint - logsumexp64(log_joint).unsqueeze(-1))


@pytest.mark.parametrize(("k", "dim", "sigma"), [(3, 30, 2.0), (5, 4, 0.5), (2, 10, 1.0)])
def test_gaussian_mixture_posterior_is_bayes(k, dim, sigma):
    data = gm(num_classes=k, dim=dim, sigma=sigma, n=400, seed=2)
    for part in (data.train, data.val, data.test):
        expected = ref_bayes_posterior(part.inputs, data.meta["means"], sigma)
        torch.testing.assert_close(part.posterior.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("key", "value"), [
    ("num_classes", 0), ("num_classes", 1.5), ("dim", 0), ("sigma", 0.0), ("sigma", -1.0),
    ("sigma", "2"), ("n", 0), ("n", 10.0), ("seed", 1.5), ("seed", True), ("seed", "0"),
    ("split", [0.5, 0.5]), ("split", [0.5, 0.6, -0.1]), ("split", [0.5, 0.2, 0.2]),
    ("split", [0.0, 0.5, 0.5]), ("split", ["a", "b", "c"]), ("split", 0.5), ("size", 10)])
def test_gaussian_mixture_bad_parameters(key, value):
    assert_config_error(key, "dataset", "gaussian_mixture", **{key: value})


# ----------------------------------------------------------------- every built-in component

BUILTIN_COMPONENTS = sorted((c.kind, c.name) for info in default_registry().plugins
                            if info.name == BUILTIN for c in info.components)
#: parameters that keep creation cheap or that the kind's contract requires
CREATE_PARAMS = {("dataset", "gaussian_mixture"): {"n": 64}}


def file_dataset_params(name, folder):
    """Parameters of the datasets that read local files, with a small file written into ``folder``."""
    import numpy as np

    x, y = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32), np.arange(40) % 2
    if name == "tensors":
        np.savez(folder / "d.npz", x=x, y=y)
        return {"path": str(folder / "d.npz")}
    if name == "csv":
        rows = "\n".join(f"{a},{b},{c},{t}" for (a, b, c), t in zip(x, y))
        (folder / "d.csv").write_text("a,b,c,label\n" + rows + "\n")
        return {"path": str(folder / "d.csv")}
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"inputs": x.tolist(), "label": y.tolist()}).save_to_disk(str(folder / "hf"))
    return {"path": str(folder / "hf")}


FILE_DATASETS = ("tensors", "csv", "hf_disk")
#: input shape per built-in backbone (mlp's default in_features)
BACKBONE_INPUT = {"mlp": (30,)}


def test_builtin_plugin_registers_every_kind():
    kinds = {kind for kind, _ in BUILTIN_COMPONENTS}
    assert kinds == {"loss", "divergence", "transform", "scheduler", "backbone", "dataset"}
    for kind, name in BUILTIN_COMPONENTS:
        assert name in kdcore.available(kind)


def check_loss(loss):
    assert isinstance(loss, nn.Module)
    assert isinstance(loss.uses_teacher, bool) and isinstance(loss.uses_target, bool)
    for shape in ((6, 5), (2, 3, 5)):
        s = random_logits(*shape, seed=1).requires_grad_()
        t = random_logits(*shape, seed=2)
        y = random_targets(*shape[:-1], classes=5)
        y.view(-1)[0] = -100
        value = loss(s, t, y)
        assert value.shape == () and torch.isfinite(value)
        value.backward()
        assert s.grad.shape == s.shape and torch.isfinite(s.grad).all()


def check_divergence(div):
    t, s = random_logp((2, 3, 6), 0), random_logp((2, 3, 6), 1)
    out = div(t, s)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    torch.testing.assert_close(div(t, t), torch.zeros(2, 3), atol=1e-6, rtol=0)


def check_transform(transform):
    if getattr(transform, "side", "teacher") != "teacher":  # logit_std, ctkd: tests/test_transform_sides.py
        return
    logp = random_logp((2, 3, 6), 2)
    target = torch.randint(0, 6, (2, 3))
    for y in (target, None):
        out = transform(logp, y)
        assert out.shape == logp.shape and torch.isfinite(out).all()
        torch.testing.assert_close(torch.logsumexp(out, -1), torch.zeros(2, 3), atol=1e-5, rtol=0)


def check_scheduler(schedule):
    for step in (0, 7, 49, 60):
        value = schedule(progress(step))
        assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_backbone(model, name):
    assert isinstance(model, nn.Module)
    out = model(torch.randn(4, *BACKBONE_INPUT[name]))
    assert out.shape == (4, 5) and torch.isfinite(out).all()


def check_dataset(data):
    assert isinstance(data, DataSplits) and data.train is not None and len(data.train) > 0
    for part in (data.train, data.val, data.test):
        if part is None:
            continue
        x, y = part[0]
        assert tuple(x.shape) == tuple(data.input_shape)
        assert 0 <= int(y) < data.num_classes


@pytest.mark.parametrize(("kind", "name"), BUILTIN_COMPONENTS, ids=[f"{k}-{n}" for k, n in BUILTIN_COMPONENTS])
def test_builtin_component_with_defaults(kind, name, tmp_path):
    params = dict(CREATE_PARAMS.get((kind, name), {}))
    if kind == "dataset" and name in FILE_DATASETS:
        params = file_dataset_params(name, tmp_path)
    if kind == "backbone":
        params["num_classes"] = 5
    obj = kdcore.create(kind, name, **params)
    if kind == "loss":
        check_loss(obj)
    elif kind == "divergence":
        check_divergence(obj)
    elif kind == "transform":
        check_transform(obj)
    elif kind == "scheduler":
        check_scheduler(obj)
    elif kind == "backbone":
        check_backbone(obj, name)
    elif kind == "dataset":
        check_dataset(obj)
    else:  # pragma: no cover - a new kind must get a convention check here
        pytest.fail(f"no call-convention check for kind {kind!r}")


def test_warmup_is_dkds_epochwise_ramp():
    from kdcore.losses.schedule import Progress

    s = kdcore.create("scheduler", "warmup")
    assert s.epochs == 20
    for epoch in range(1, 40):
        for step_in_epoch in (0, 6):
            assert s(Progress(epoch, (epoch - 1) * 7 + step_in_epoch, 40, 7)) == min(epoch / 20, 1.0)
    assert kdcore.create("scheduler", "warmup", epochs=5)(Progress(1, 0, 10, 7)) == 0.2


@pytest.mark.parametrize("bad", [0, 2.5, "3"])
def test_warmup_rejects_bad_epochs(bad):
    with pytest.raises(kdcore.ConfigError, match="epochs"):
        kdcore.create("scheduler", "warmup", epochs=bad)
