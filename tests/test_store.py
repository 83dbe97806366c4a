"""The teacher store: record coding, the k + 1 buckets, and training from a store
(``[teacher] source = "store"``) against the online teacher; the teacher cache."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import kdcore
from kdcore.data import fingerprint
from kdcore.engine import build_trainer
from kdcore.engine.capture import capture
from kdcore.engine.teacher_cache import CachedTeacher, _Rows
from kdcore.signals import buckets
from kdcore.signals.records import VALUE_CODINGS, check_values, choose_layout, decode, encode, top_k

spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).parent / "helpers_runs.py")
runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runs)


# -- record coding --------------------------------------------------------------------------------
@pytest.mark.parametrize("classes,k", [(3, 3), (3, 1), (10, 4), (256, 8), (256, 32), (256, 128), (256, 256),
                                       (32000, 128), (70000, 5)])
@pytest.mark.parametrize("values", VALUE_CODINGS)
def test_records_round_trip(classes, k, values):
    g = torch.Generator().manual_seed(classes + k)
    logits = torch.randn(40, classes, generator=g) * 4
    ids, logp, rest = top_k(logits, k)
    layout = choose_layout(classes, k, values)
    records = encode(layout, ids, logp, rest)
    assert records.shape == (40, layout.record_bytes)
    ids2, logp2, rest2 = decode(layout, records)
    assert torch.equal(ids2, ids)
    err = (logp2.double() - logp).abs().max().item()
    if values == "float32":
        assert err <= 1e-6 * max(1.0, logp.abs().max().item())
    elif values == "float16":
        assert err <= 2e-3 * max(1.0, logp.abs().max().item())
    else:  # uint8: half a step of (top - smallest kept) / 255, plus float16 rounding of the step
        spread = (logp.max(-1).values - logp.min(-1).values).max().item()
        assert err <= spread / 255 * 0.51 + 1e-3
    assert (rest is None) == (k == classes) == (rest2 is None)
    if rest is not None:
        assert torch.allclose(rest2.double(), rest, atol=1e-5, rtol=1e-6)


def test_ids_coding_is_the_smaller_one():
    assert choose_layout(256, 128, "uint8").ids == "bitmap"          # 32 bytes
    ef = choose_layout(32000, 128, "uint8")
    assert ef.ids == "elias-fano" and ef.ids_bytes < 128 * 2           # below uint16 ids
    assert choose_layout(256, 128, "uint8").record_bytes == 32 + 128 + 6 + 4


def test_tail_against_float64_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 50, generator=g, dtype=torch.float64) * 3
    ids, logp, rest = top_k(logits.float(), 7)
    p = torch.softmax(logits, -1)
    kept = p.gather(-1, ids)
    assert torch.equal(ids, ids.sort(-1).values)
    assert torch.equal(kept.argsort(-1, descending=True), kept.argsort(-1, descending=True))
    assert (p.topk(7, -1).values.sum(-1) - kept.sum(-1)).abs().max() < 1e-12  # the k most likely
    assert torch.allclose(rest, torch.log1p(-kept.sum(-1)), atol=1e-6)
    assert torch.allclose(logp, kept.log(), atol=1e-6)


# -- buckets --------------------------------------------------------------------------------------
def test_student_buckets_and_targets_against_reference():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 6, 12, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(12, generator=g)[:4].sort().values for _ in range(30)]).view(5, 6, 4)
    b = buckets.reduce_logits(s, ids, full=False)
    q = torch.softmax(s, -1)
    ref = torch.cat([q.gather(-1, ids), 1 - q.gather(-1, ids).sum(-1, keepdim=True)], -1)
    assert torch.allclose(torch.softmax(b, -1), ref, atol=1e-12)
    target = torch.randint(0, 12, (5, 6), generator=g)
    target[0, :2] = -100
    y = buckets.bucket_targets(target, ids)
    for i in range(5):
        for t in range(6):
            if target[i, t] == -100:
                assert y[i, t] == -100
            else:
                where = (ids[i, t] == target[i, t]).nonzero()
                assert y[i, t] == (where.item() if len(where) else 4)


def _losses():
    out = [kdcore.create("loss", "kd", temperature=2.0)]
    for name, params in (("dkd", {"temperature": 2.0}), ("nkd", {"temperature": 2.0})):
        if name in kdcore.available("loss"):
            out.append(kdcore.create("loss", name, **params))
    return out


@pytest.mark.parametrize("loss", _losses(), ids=lambda l: type(l).__name__)
def test_all_classes_kept_equals_the_online_teacher(loss):
    """k = C: every loss on the buckets equals the loss on the full distributions (token level, -100)."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 5, 9, generator=g, requires_grad=True)
    t = torch.randn(3, 5, 9, generator=g) * 2
    y = torch.randint(0, 9, (3, 5), generator=g)
    y[1, :3] = -100
    ids, logp, rest = top_k(t.reshape(-1, 9), 9)
    teacher = buckets.TopKOutputs(ids.view(3, 5, 9), logp.float().view(3, 5, 9), None)
    got = buckets.bucket_loss(loss, kdcore.Outputs(s), teacher, y)
    want = loss(s, t, y)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    g1, = torch.autograd.grad(got, s)
    g2, = torch.autograd.grad(want, s)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_kd_on_buckets_against_float64_reference():
    """kd at T on k < C: KL between the softened k + 1 bucket distributions (the documented meaning)."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(20, 30, generator=g, dtype=torch.float64)
    t = torch.randn(20, 30, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 30, (20,), generator=g)
    y[:4] = -100
    T, k = 2.0, 6
    ids, logp, rest = top_k(t, k)
    teacher = buckets.TopKOutputs(ids, logp, rest)
    got = buckets.bucket_loss(kdcore.create("loss", "kd", temperature=T), kdcore.Outputs(s), teacher, y)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    pb = torch.cat([p.gather(-1, ids), 1 - p.gather(-1, ids).sum(-1, keepdim=True)], -1)
    qb = torch.cat([q.gather(-1, ids), 1 - q.gather(-1, ids).sum(-1, keepdim=True)], -1)
    pt, qt = pb ** (1 / T), qb ** (1 / T)
    pt, qt = pt / pt.sum(-1, keepdim=True), qt / qt.sum(-1, keepdim=True)
    rows = T * T * (pt * (pt.log() - qt.log())).sum(-1)
    want = rows[y != -100].mean()
    assert math.isclose(got.item(), want.item(), rel_tol=1e-9)


@pytest.mark.parametrize("k", [5, 17])
def test_fused_student_on_buckets_equals_dense(k):
    """A student given as Outputs(hidden, head) with chunk_size: same value and gradients."""
    g = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(8, 17).double()
    hidden = torch.randn(4, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, 17, generator=g, dtype=torch.float64)
    y = torch.randint(0, 17, (4, 6), generator=g)
    y[0] = -100
    ids, logp, rest = top_k(t.reshape(-1, 17), k)
    teacher = buckets.TopKOutputs(ids.view(4, 6, k), logp.view(4, 6, k), None if rest is None else rest.view(4, 6))
    values = []
    for chunk in (None, 5):
        loss = kdcore.create("loss", "kd", temperature=2.0, chunk_size=chunk)
        student = kdcore.Outputs(hidden=hidden, head=head) if chunk else kdcore.Outputs(head(hidden))
        v = buckets.bucket_loss(loss, student, teacher, y)
        values.append((v, torch.autograd.grad(v, [hidden, head.weight])))
    (v1, g1), (v2, g2) = values
    assert torch.allclose(v1, v2, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(g1, g2))


# -- training from a store -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("store_teacher")
    kdcore.train(runs.teacher_config(1), root / "teacher", quiet=True)
    return str(root / "teacher" / "checkpoints" / "best.pt")


def _student(ckpt, **run):
    conf = runs.student_config(ckpt, epochs=2, **run)
    conf["student"]["dropout"] = 0.0
    conf["optim"] = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0}
    conf["loss"] = [{"name": "ce"}, {"name": "kd", "temperature": 2.0}]
    if "dkd" in kdcore.available("loss"):
        conf["loss"].append({"name": "dkd", "temperature": 2.0, "beta": 2.0})
    return conf


def _write(path: Path, conf) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(conf))
    return path


def _from_store(conf, root):
    conf = copy.deepcopy(conf)
    conf["teacher"].update(source="store", store=str(root))
    return conf


def _weights(trainer):
    return torch.cat([p.detach().reshape(-1) for p in trainer.student.parameters()])


def test_training_from_a_full_store_equals_the_online_teacher(teacher_ckpt, tmp_path):
    conf = _student(teacher_ckpt)
    manifest = capture(_write(tmp_path / "s.toml", conf), tmp_path / "store", quiet=True)
    assert manifest["complete"] and manifest["k"] == 3 and manifest["layout"]["values"] == "float32"
    trained = []
    for c in (conf, _from_store(conf, tmp_path / "store")):
        trainer = build_trainer(c, None, quiet=True)
        trainer.fit()
        trained.append(trainer)
    online, stored = trained
    assert stored.teacher is None and online.teacher is not None
    assert torch.allclose(_weights(online), _weights(stored), atol=1e-5)


def test_training_from_a_top_k_store(teacher_ckpt, tmp_path):
    conf = _student(teacher_ckpt)
    capture(_write(tmp_path / "s.toml", conf), tmp_path / "store", top_k=2, quiet=True)
    summary = kdcore.train(_from_store(conf, tmp_path / "store"), tmp_path / "run", quiet=True)
    assert all(math.isfinite(v) for k, v in summary["final"].items() if k.startswith("loss/"))
    assert summary["test_acc"] > 0.4


def test_a_store_of_other_data_or_another_teacher_is_refused(teacher_ckpt, tmp_path):
    conf = _student(teacher_ckpt)
    capture(_write(tmp_path / "s.toml", conf), tmp_path / "store", quiet=True)
    other_data = _from_store(conf, tmp_path / "store")
    other_data["data"]["n"] = 700
    with pytest.raises(kdcore.ConfigError, match=r"^teacher\.store: .*other data"):
        build_trainer(other_data, None, quiet=True)
    other_teacher = _from_store(conf, tmp_path / "store")
    other_teacher["teacher"]["hidden"] = [16]
    with pytest.raises(kdcore.ConfigError, match=r"^teacher\.store: .*another teacher"):
        build_trainer(other_teacher, None, quiet=True)
    no_teacher_check = _from_store(conf, tmp_path / "store")
    no_teacher_check["teacher"] = {"source": "store", "store": str(tmp_path / "store")}
    build_trainer(no_teacher_check, None, quiet=True)  # only the data are checked
    with pytest.raises(kdcore.ConfigError, match=r"^teacher\.store: no teacher store"):
        build_trainer(_from_store(conf, tmp_path / "nowhere"), None, quiet=True)


def test_config_keys_of_the_teacher_source(teacher_ckpt):
    conf = _student(teacher_ckpt)
    bad = copy.deepcopy(conf)
    bad["teacher"]["source"] = "disk"
    with pytest.raises(kdcore.ConfigError, match=r"^teacher\.source: must be one of"):
        build_trainer(bad, None, quiet=True)
    bad["teacher"]["source"] = "store"
    with pytest.raises(kdcore.ConfigError, match=r"^teacher\.store: required"):
        build_trainer(bad, None, quiet=True)
    bad = copy.deepcopy(conf)
    bad["teacher"]["store"] = "x"
    with pytest.raises(kdcore.ConfigError, match=r"^teacher\.store: only with source"):
        build_trainer(bad, None, quiet=True)
    bad = copy.deepcopy(conf)
    bad["teacher"]["cache_budget_mb"] = 0
    with pytest.raises(kdcore.ConfigError, match=r"^teacher\.cache_budget_mb: must be > 0"):
        build_trainer(bad, None, quiet=True)


# -- random augmentation ------------------------------------------------------------------------------
class _Jitter(torch.utils.data.Dataset):
    """A split whose samples get random noise on each read (undeclared: found by the probe)."""

    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        x, y = self.split[i]
        return x + 0.01 * torch.randn(x.shape), y


def test_random_views_are_declared_or_probed():
    data = kdcore.create("dataset", "gaussian_mixture", n=200)
    assert not fingerprint.random_views(data)
    jitter = kdcore.data.DataSplits(_Jitter(data.train), None, None, 3, (30,))
    assert fingerprint.random_views(jitter)
    assert fingerprint.split_fingerprint(jitter.train) == fingerprint.split_fingerprint(jitter.train)
    declared = kdcore.data.DataSplits(data.train, None, None, 3, (30,), meta={"random_views": True})
    assert fingerprint.random_views(declared)


def test_store_and_cache_are_refused_on_random_augmentation(teacher_ckpt, tmp_path, monkeypatch):
    (tmp_path / "jitter_data.py").write_text(
        "import torch, kdcore\n"
        "from kdcore.data import DataSplits\n"
        "class Jitter(torch.utils.data.Dataset):\n"
        "    def __init__(self, split): self.split = split\n"
        "    def __len__(self): return len(self.split)\n"
        "    def __getitem__(self, i):\n"
        "        x, y = self.split[i]\n"
        "        return x + 0.01 * torch.randn(x.shape), y\n"
        "def jitter(n=600):\n"
        "    d = kdcore.create('dataset', 'gaussian_mixture', n=n)\n"
        "    return DataSplits(Jitter(d.train), d.val, None, d.num_classes, d.input_shape)\n")
    conf = _student(teacher_ckpt)
    conf["data"] = {"name": "python:jitter_data:jitter"}
    conf["teacher"]["cache"] = True
    path = _write(tmp_path / "s.toml", conf)
    with pytest.raises(kdcore.ConfigError, match=r"^teacher\.cache: .*augmentation is random"):
        build_trainer(path, None, quiet=True)
    with pytest.raises(kdcore.ConfigError, match=r"^teacher\.fixed_view: .*augmentation is random"):
        capture(path, tmp_path / "store", quiet=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    trainer = build_trainer(path, None, ["teacher.fixed_view=true"], quiet=True)  # opted in
    assert isinstance(trainer.teacher_source, CachedTeacher)


# -- the teacher cache ------------------------------------------------------------------------------
def test_cached_teacher_trains_like_the_running_one(teacher_ckpt):
    conf = _student(teacher_ckpt)
    cached = copy.deepcopy(conf)
    cached["teacher"]["cache"] = True
    trained = []
    for c in (conf, cached):
        trainer = build_trainer(c, None, quiet=True)
        trainer.fit()
        trained.append(trainer)
    plain, with_cache = trained
    assert isinstance(with_cache.teacher_source, CachedTeacher) and with_cache.teacher_source.on_device
    assert with_cache.teacher_source.hits >= len(with_cache.batches) - 1  # the second epoch read the cache
    assert torch.allclose(_weights(plain), _weights(with_cache), atol=1e-5)


def test_cache_rows_spill_to_a_file_beyond_the_budget(tmp_path):
    value = torch.randn(4, 3, 5).to(torch.bfloat16)
    rows = _Rows(10, value, budget_bytes=0, device=torch.device("cpu"), spill_dir=tmp_path)
    assert not rows.on_device
    index = torch.tensor([7, 2, 9, 0])
    rows.put(index, value)
    assert torch.equal(rows.get(torch.tensor([2, 0])), value[[1, 3]])
    assert list(tmp_path.iterdir()) == []  # an anonymous file: nothing is left behind


def test_augmented_image_splits_declare_random_views():
    if "digits" not in kdcore.available("dataset"):
        pytest.skip("kdcore-vision (digits) is not installed")
    assert fingerprint.random_views(kdcore.create("dataset", "digits"))
    assert not fingerprint.random_views(kdcore.create("dataset", "digits", augment=False))


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(scale=st.sampled_from([1e-3, 1.0, 30.0, 1e3, 1e4]), k=st.integers(1, 11), seed=st.integers(0, 2**16),
       temperature=st.sampled_from([0.5, 1.0, 4.0]))
def test_bucket_loss_is_finite_on_extreme_float32_inputs(scale, k, seed, temperature):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(6, 12, generator=g) * scale).requires_grad_()
    t = torch.randn(6, 12, generator=g) * scale
    y = torch.randint(0, 12, (6,), generator=g)
    y[0] = -100
    ids, logp, rest = top_k(t, k)
    layout = choose_layout(12, k, "uint8")
    decoded = decode(layout, encode(layout, ids, logp, rest))
    check_values(layout, *decoded)  # what the coding gives passes the reader's value checks
    teacher = buckets.TopKOutputs(*decoded)
    for loss in _losses():
        loss.temperature = temperature
        value = buckets.bucket_loss(loss, kdcore.Outputs(s), teacher, y)
        grad, = torch.autograd.grad(value, s)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), type(loss).__name__


def test_the_cache_refuses_inputs_that_changed():
    """A pipeline whose randomness the probe missed: the second read of a sample is refused."""
    from kdcore.engine.batches import Batch
    from kdcore.engine.teacher_source import ModelTeacher

    model = torch.nn.Linear(4, 3)
    cache = CachedTeacher(ModelTeacher(model, model), 10, 1, torch.device("cpu"), None)
    x = torch.randn(5, 4)
    batch = Batch.of(x, torch.zeros(5, dtype=torch.long), torch.arange(5))
    first = cache(batch, x, ())
    again = cache(batch, x.clone(), ())
    assert cache.hits == 1 and torch.equal(again.logits, first.logits)
    with pytest.raises(kdcore.ConfigError, match=r"^teacher\.cache: the inputs of training sample 2"):
        cache(batch, x + (torch.arange(5) == 2).float()[:, None] * 1e-3, ())


def test_teacher_source_keys_round_trip_through_the_resolved_config():
    import tomllib

    from kdcore import config as cfg

    base = {"data": {"name": "gaussian_mixture"}, "student": {"backbone": "mlp"}, "loss": [{"name": "kd"}]}
    for teacher in ({"source": "store", "store": "/somewhere/store"},
                    {"backbone": "mlp", "checkpoint": "t.pt", "cache": True, "cache_budget_mb": 5, "fixed_view": True}):
        conf = cfg.from_dict({**base, "teacher": teacher})
        again = cfg.from_dict(tomllib.loads(cfg.dumps(conf)))
        assert again.teacher == conf.teacher
        assert tomllib.loads(cfg.dumps(conf))["teacher"] == teacher
    with pytest.raises(kdcore.ConfigError, match=r"^teacher\.hidden: a stored teacher without a backbone"):
        cfg.from_dict({**base, "teacher": {"source": "store", "store": "x", "hidden": [3]}})
    with pytest.raises(kdcore.ConfigError, match=r"^teacher\.cache: a stored teacher is read"):
        cfg.from_dict({**base, "teacher": {"source": "store", "store": "x", "cache": True}})
