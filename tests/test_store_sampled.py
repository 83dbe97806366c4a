"""The sampled teacher store (``kdcore capture --sample K``, docs/signals.md "Sampled stores"):
the draws' weights estimate the teacher without bias, the bucket KL's student gradient is
unbiased for the full KL gradient (top-k's is not), float64 references at token level with
-100 rows, finite values on extreme inputs, reproducible and repairable captures, the
command line, old stores, and training from a sampled store."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdcore
from kdcore.engine.capture import capture, draw_seed
from kdcore.signals import buckets, store
from kdcore.signals.records import (DamagedRecord, check_values, choose_layout, decode, draw, draw_weights,
                                    encode_draws, top_k)

spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).parent / "helpers_runs.py")
runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runs)

KD1 = kdcore.create("loss", "kd", temperature=1.0)
#: a draw's deviation beyond this many standard errors fails a statistical check (fixed seeds: the
#: checks are deterministic; at 5 sigma a correct estimator fails one element in ~1.7 million)
SIGMAS = 5.0


def _sampled(logits: torch.Tensor, k: int, seed: int) -> buckets.TopKOutputs:
    """The sampled teacher of ``logits`` ``[m, C]`` as a store reads it (drawn, coded, decoded)."""
    layout = choose_layout(logits.shape[-1], k, "auto", "sample")
    ids, logw, rest = decode(layout, encode_draws(layout, draw(logits, k, seed)))
    check_values(layout, ids, logw, rest)
    return buckets.TopKOutputs(ids, logw.double(), rest.double(), sampled=True)


def _dense(teacher: buckets.TopKOutputs, classes: int) -> torch.Tensor:
    """The teacher's weights over all classes ``[m, C]`` (0 off the draws)."""
    k = teacher.ids.shape[-1]
    return torch.zeros(teacher.ids.shape[0], classes, dtype=torch.float64).scatter_add_(
        -1, teacher.ids, teacher.logits[:, :k].double().exp())


# -- draws and their coding ------------------------------------------------------------------------
def test_draw_weights_are_counts_over_k():
    draws = torch.tensor([[0, 0, 3, 5, 5, 5], [2, 2, 2, 2, 2, 2]])
    w = draw_weights(draws)
    inf = float("-inf")
    want = torch.tensor([[2 / 6, 0, 1 / 6, 3 / 6, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.float64).log()
    want[0, [1, 4, 5]] = inf
    want[1, 1:] = inf
    assert torch.equal(w, want.float())


@pytest.mark.parametrize("classes,k", [(3, 8), (10, 1), (256, 32), (256, 240), (32000, 64)])
def test_sampled_records_round_trip(classes, k):
    g = torch.Generator().manual_seed(classes + k)
    logits = torch.randn(30, classes, generator=g) * 3
    draws = draw(logits, k, seed=7)
    layout = choose_layout(classes, k, "auto", "sample")
    records = encode_draws(layout, draws)
    assert records.shape == (30, layout.record_bytes)
    # Elias-Fano of k non-decreasing ids below C: k low parts and k + (C - 1) >> low unary bits, the fewest
    assert layout.record_bytes == min(-(-(k * low + k + ((classes - 1) >> low)) // 8)
                                      for low in range(classes.bit_length() + 1))
    ids, logw, rest = decode(layout, records)
    assert torch.equal(ids, draws) and torch.equal(logw, draw_weights(draws))
    assert rest.isneginf().all()
    counts = logw.double().exp() * k  # the weights are counts / k, up to float32 rounding of their log
    assert (counts - counts.round()).abs().max() < 1e-5 and torch.equal(counts.round().sum(-1), torch.full((30,), k,
                                                                                                  dtype=torch.float64))


def test_the_same_seed_draws_the_same_ids_and_another_seed_others():
    logits = torch.randn(50, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw(logits, 16, 3), draw(logits, 16, 3))
    assert not torch.equal(draw(logits, 16, 3), draw(logits, 16, 4))


def test_draws_never_pick_an_id_of_zero_probability():
    logits = torch.full((20, 9), float("-inf"))
    logits[:, [2, 6]] = 0.0
    ids = draw(logits, 64, 0)
    assert set(ids.unique().tolist()) == {2, 6}


def test_damaged_draws_are_named():
    layout = choose_layout(600, 4, "auto", "sample")
    assert layout.low_bits > 0  # the low bits can put ids out of order or out of range
    ids = torch.tensor([[1, 2, 3, 4], [5, 3, 7, 9], [1, 2, 3, 600]])
    with pytest.raises(DamagedRecord, match="^record 1: its ids are out of order$"):
        check_values(layout, ids, draw_weights(ids), None)
    ids[1] = torch.tensor([3, 5, 7, 9])
    with pytest.raises(DamagedRecord, match="^record 2: an id is 600, outside 0..599$"):
        check_values(layout, ids, draw_weights(ids), None)
    with pytest.raises(kdcore.ConfigError, match=r"^--sample: must be in 1 \.\. 65536 \(draws per position\), got 0$"):
        choose_layout(600, 0, "auto", "sample")


# -- unbiasedness --------------------------------------------------------------------------------
def test_the_weights_average_to_the_teacher():
    """E[w] = p: the mean of R independent draws' weights is within 5 standard errors of p,
    sqrt(p (1 - p) / (K R)) per class (the variance of a multinomial frequency)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 12, generator=g, dtype=torch.float64) * 2
    p = torch.softmax(logits, -1)
    k, r = 8, 400
    mean = sum(_dense(_sampled(logits, k, draw_seed(0, i)), 12) for i in range(r)) / r
    se = (p * (1 - p) / (k * r)).sqrt()
    assert ((mean - p).abs() <= SIGMAS * se).all(), ((mean - p).abs() / se).max()


def test_the_bucket_kl_gradient_is_unbiased_and_top_k_is_not():
    """The student gradient of kd (T = 1) on the sampled buckets, averaged over R draws, is
    within 5 standard errors of the full KL's gradient (softmax(s) - p) / m; the top-k store's
    gradient with as many ids misses it by far more (its tail gets p's tail mass in the
    student's proportions)."""
    g = torch.Generator().manual_seed(2)
    m, classes, k, r = 4, 50, 4, 300
    t = torch.randn(m, classes, generator=g, dtype=torch.float64)
    s = torch.randn(m, classes, generator=g, dtype=torch.float64, requires_grad=True)
    p, q = torch.softmax(t, -1), torch.softmax(s.detach(), -1)
    full = (q - p) / m
    got, = torch.autograd.grad(KD1(s, t), s)
    assert torch.allclose(got, full, atol=1e-12)  # the reference is the online kd gradient
    mean = torch.zeros_like(full)
    for i in range(r):
        teacher = _sampled(t, k, draw_seed(0, i))
        grad, = torch.autograd.grad(buckets.bucket_loss(KD1, kdcore.Outputs(s), teacher, None), s)
        mean += grad / r
    se = (p * (1 - p) / k).sqrt() / m / r ** 0.5
    assert ((mean - full).abs() <= SIGMAS * se).all(), ((mean - full).abs() / se).max()
    ids, logp, rest = top_k(t, k)
    topk, = torch.autograd.grad(buckets.bucket_loss(KD1, kdcore.Outputs(s), buckets.TopKOutputs(ids, logp, rest),
                                                    None), s)
    assert ((topk - full).abs() / se).max() > 4 * SIGMAS


# -- float64 references, token level -------------------------------------------------------------
def test_kd_on_draws_against_float64_reference_token_level():
    """[B, T, V] with -100 rows: kd (T = 1) on the sampled buckets is the mean over kept rows of
    sum_i w_i log(w_i / q_i), q the student's full softmax; its gradient is (q - w) / rows."""
    g = torch.Generator().manual_seed(3)
    b, length, vocab, k = 3, 5, 17, 6
    t = torch.randn(b * length, vocab, generator=g, dtype=torch.float64) * 2
    s = torch.randn(b, length, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, vocab, (b, length), generator=g)
    y[0, :2] = -100
    y[2, 4] = -100
    flat = _sampled(t, k, seed=5)
    teacher = buckets.TopKOutputs(flat.ids.view(b, length, k), flat.logits[:, :k].reshape(b, length, k),
                                  flat.logits[:, k].reshape(b, length), sampled=True)
    got = buckets.bucket_loss(KD1, kdcore.Outputs(s), teacher, y)
    w = _dense(flat, vocab).view(b, length, vocab)
    w = w / w.sum(-1, keepdim=True)  # the decoded weights (float32 logs of counts / k), as a distribution
    logq = torch.log_softmax(s.detach(), -1)
    terms = torch.where(w > 0, w * (w.log() - logq), torch.zeros_like(w)).sum(-1)
    keep = y != -100
    want = terms[keep].mean()
    assert abs(got.item() - want.item()) <= 1e-12 * max(1.0, want.item())
    grad, = torch.autograd.grad(got, s)
    ref = (logq.exp() - w) * keep.unsqueeze(-1) / keep.sum()
    assert torch.allclose(grad, ref, atol=1e-13)


def test_fused_student_on_draws_equals_dense():
    """A student given as Outputs(hidden, head) with chunk_size: the chunks mask the repeated
    draws like the dense path (same value and gradients, T = 1 and 2)."""
    g = torch.Generator().manual_seed(6)
    head = torch.nn.Linear(8, 17).double()
    hidden = torch.randn(4, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(24, 17, generator=g, dtype=torch.float64)
    y = torch.randint(0, 17, (4, 6), generator=g)
    y[0] = -100
    flat = _sampled(t, 9, seed=1)
    teacher = buckets.TopKOutputs(flat.ids.view(4, 6, 9), flat.logits[:, :9].reshape(4, 6, 9),
                                  flat.logits[:, 9].reshape(4, 6), sampled=True)
    for temperature in (1.0, 2.0):
        values = []
        for chunk in (None, 5):
            loss = kdcore.create("loss", "kd", temperature=temperature, chunk_size=chunk)
            student = kdcore.Outputs(hidden=hidden, head=head) if chunk else kdcore.Outputs(head(hidden))
            v = buckets.bucket_loss(loss, student, teacher, y)
            values.append((v, torch.autograd.grad(v, [hidden, head.weight])))
        (v1, g1), (v2, g2) = values
        assert torch.isfinite(v1) and torch.allclose(v1, v2, atol=1e-12)
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(g1, g2))


@settings(max_examples=40, deadline=None)
@given(scale=st.sampled_from([1e-3, 1.0, 30.0, 1e3, 1e5]), shift=st.sampled_from([0.0, -1e4, 1e4]),
       seed=st.integers(0, 2**16), k=st.sampled_from([1, 3, 64]))
def test_finite_in_float32_on_extreme_inputs(scale, shift, seed, k):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(2, 4, 11, generator=g) * scale + shift
    s = (torch.randn(2, 4, 11, generator=g) * scale - shift).requires_grad_()
    y = torch.randint(0, 11, (2, 4), generator=g)
    y[1, 0] = -100
    flat = _sampled(t.reshape(-1, 11), k, seed)
    teacher = buckets.TopKOutputs(flat.ids.view(2, 4, k), flat.logits[:, :k].float().reshape(2, 4, k),
                                  flat.logits[:, k].float().reshape(2, 4), sampled=True)
    for loss in (KD1, kdcore.create("loss", "kd", temperature=2.0)):
        value = buckets.bucket_loss(loss, kdcore.Outputs(s), teacher, y)
        grad, = torch.autograd.grad(value, s)
        assert torch.isfinite(value) and torch.isfinite(grad).all()


# -- captures ------------------------------------------------------------------------------------
K, PER = 8, 100  # 540 training samples of 3 classes: shards of samples 0..99, ..., 500..539


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampled")
    kdcore.train(runs.teacher_config(1), root / "teacher", quiet=True)
    conf = runs.student_config(str(root / "teacher" / "checkpoints" / "best.pt"), epochs=1)
    conf["loss"] = [{"name": "ce"}, {"name": "kd", "temperature": 1.0}]
    return runs.write(root / "student.toml", conf)


@pytest.fixture(scope="module")
def pristine(config, tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine") / "store"
    capture(config, root, sample=K, shard_samples=PER, quiet=True)
    return root


def _shards(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("shard-*"))}


def test_a_sampled_store_records_its_kind_and_k(pristine):
    m = json.loads((pristine / "manifest.json").read_text())
    assert (m["kind"], m["k"], m["version"], m["layout"]["kind"], m["layout"]["values"]) == \
        ("sample", K, 2, "sample", "counts")
    assert m["capture_args"][1:] == ["--sample", str(K), "--shard-samples", str(PER)]
    assert m["total_bytes"] == 540 * m["layout"]["record_bytes"] == 540 * 2  # 8 draws of 3 ids: 10 bits
    ids, logw, rest = store.StoreReader.open(pristine).read(torch.arange(540))
    assert ids.shape == (540, K) and rest.isneginf().all()
    assert torch.allclose(logw.double().exp().sum(-1), torch.ones(540, dtype=torch.float64), atol=1e-6)


def test_recapture_is_byte_identical_whatever_the_batch_size(config, pristine, tmp_path):
    capture(config, tmp_path / "again", sample=K, shard_samples=PER, batch_size=7, quiet=True)
    assert _shards(tmp_path / "again") == _shards(pristine)
    other = capture(config, tmp_path / "seed", ["run.seed=4"], sample=K, shard_samples=PER, quiet=True)
    assert other["sample_seed"] == 4 and _shards(tmp_path / "seed") != _shards(pristine)


def test_a_damaged_sampled_shard_is_named_and_the_same_capture_repairs_it(config, pristine, tmp_path, capsys,
                                                                          monkeypatch):
    root = tmp_path / "store"
    shutil.copytree(pristine, root)
    shard = root / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[2 * 40] ^= 0x01  # a draw of sample 140 moves
    shard.write_bytes(bytes(data))
    command = f"kdcore capture {config} --out {root} --sample {K} --shard-samples {PER}"
    with pytest.raises(store.DamagedStore) as exc:
        store.StoreReader.open(root).read(torch.tensor([140]))
    assert str(exc.value) == (f"{shard} (samples 100..199) is damaged (its SHA-256 differs from the one in "
                              f"manifest.json); run the same capture again to rewrite it: {command}")
    conf = runs.write(tmp_path / "from_store.toml", {**runs.student_config("unused", epochs=1),
                                                     "teacher": {"source": "store", "store": str(root)},
                                                     "loss": [{"name": "kd", "temperature": 1.0}]})
    code, err = runs.cli(capsys, "train", str(conf), "--out", str(tmp_path / "run"))
    assert (code, runs.one_line(err)) == (1, f"kdcore: failed: {exc.value}")
    written, real = [], store.write_shard
    monkeypatch.setattr(store, "write_shard", lambda r, j, rec: (written.append(j), real(r, j, rec)))
    code, err = runs.cli(capsys, *command.split()[1:], "--quiet")
    assert (code, written, _shards(root)) == (0, [1], _shards(pristine))


def test_a_record_coding_too_few_draws_is_named_where_no_digest_is_recorded(config, pristine, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(pristine, root)
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["shard_sha256"]  # a store without digests: the value checks find it
    (root / "manifest.json").write_text(json.dumps(manifest))
    shard = root / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    left = K - bin(data[2 * 17]).count("1")
    data[2 * 17] = 0  # sample 17's first 8 bits: the unary code loses some of its ones
    shard.write_bytes(bytes(data))
    with pytest.raises(store.DamagedStore) as exc:
        store.StoreReader.open(root).read(torch.arange(10, 20))
    assert str(exc.value) == (f"{shard} (samples 0..99) holds a damaged record at sample 17 (it codes {left} ids, "
                              f"not k = {K}); run the same capture again to rewrite it: kdcore capture {config} "
                              f"--out {root} --sample {K} --shard-samples {PER}")


@pytest.mark.parametrize("kind", ["--sample", "--top-k"])
def test_a_teacher_giving_nan_stops_the_capture_before_the_shard(config, tmp_path, capsys, monkeypatch, kind):
    from kdcore.engine import capture as capture_module

    real, calls = capture_module.forward, []

    def nan_in_the_second_batch(*args):
        out = real(*args)
        calls.append(1)
        if len(calls) == 2:  # samples 50..99
            logits = out.logits.clone()
            logits[7, 1] = float("nan")
            out = kdcore.Outputs(logits)
        return out

    monkeypatch.setattr(capture_module, "forward", nan_in_the_second_batch)
    root = tmp_path / "s"
    code, err = runs.cli(capsys, "capture", str(config), "--out", str(root), kind, "2", "--batch-size", "50",
                         "--shard-samples", "100", "--quiet")
    assert (code, runs.one_line(err)) == (1, "kdcore: failed: capture: the teacher's outputs on training sample 57 "
                                             "are not log-probabilities (a log-probability is NaN); nothing of them "
                                             "was written; check the teacher's checkpoint, or capture with run.amp "
                                             "= \"off\"")
    assert not list(root.glob("shard-*"))


def test_sample_and_top_k_are_exclusive(config, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        runs.cli(capsys, "capture", str(config), "--out", str(tmp_path / "s"), "--top-k", "2", "--sample", "4")
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "kdcore capture: error: argument --sample: not allowed with argument --top-k"
    with pytest.raises(kdcore.ConfigError, match=r"^--sample: not allowed with --top-k \(a store keeps the top k "
                                                 r"or draws, not both\)$"):
        capture(config, tmp_path / "s", top_k=2, sample=4, quiet=True)
    code, err = runs.cli(capsys, "capture", str(config), "--out", str(tmp_path / "s"), "--sample", "4",
                         "--values", "uint8")
    assert (code, runs.one_line(err)) == (2, "kdcore: error: --values: a sampled store (--sample) keeps counts of "
                                             "draws, not values; drop --values")
    code, err = runs.cli(capsys, "capture", str(config), "--out", str(tmp_path / "s"), "--sample", "0")
    assert (code, runs.one_line(err)) == (2, "kdcore: error: --sample: must be in 1 .. 65536 (draws per "
                                             "position), got 0")
    assert not (tmp_path / "s").exists()


def test_a_top_k_capture_into_a_sampled_store_is_refused(config, pristine, tmp_path, capsys):
    root = tmp_path / "store"
    shutil.copytree(pristine, root)
    code, err = runs.cli(capsys, "capture", str(config), "--out", str(root), "--top-k", "2")
    assert (code, runs.one_line(err)) == (2, f"kdcore: error: --out: {root} holds a capture with another 'kind' "
                                             "(of another teacher, data or settings); choose another --out, or "
                                             "delete it to capture again")
    assert _shards(root) == _shards(pristine)


def test_a_store_of_format_version_1_still_reads_and_repairs(config, tmp_path, monkeypatch):
    """A top-k store as kdcore wrote it before draws (no 'kind', 'drops_ignored', 'sample_seed',
    'stored_positions'; version 1) reads, and its capture finds it complete."""
    root = tmp_path / "old"
    capture(config, root, top_k=2, shard_samples=PER, quiet=True)
    manifest = json.loads((root / "manifest.json").read_text())
    for key in ("kind", "drops_ignored", "sample_seed", "stored_positions"):
        del manifest[key]
    manifest["version"] = 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    before = store.StoreReader.open(root).read(torch.arange(540))
    (root / "shard-00003.bin").unlink()
    written, real = [], store.write_shard
    monkeypatch.setattr(store, "write_shard", lambda r, j, rec: (written.append(j), real(r, j, rec)))
    capture(config, root, top_k=2, shard_samples=PER, quiet=True)
    assert written == [3]
    after = store.StoreReader.open(root).read(torch.arange(540))
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# -- training ------------------------------------------------------------------------------------
def test_training_from_a_sampled_store(pristine, tmp_path):
    conf = runs.student_config("unused", epochs=2)
    conf["teacher"] = {"source": "store", "store": str(pristine)}
    conf["loss"] = [{"name": "ce"}, {"name": "kd", "temperature": 1.0}]
    out = kdcore.train(conf, tmp_path / "run", quiet=True)
    assert out["final"]["loss/kd"] > 0 and out["final"]["val_acc"] > 0.5


def test_a_term_the_draws_do_not_estimate_without_bias_is_warned_about(pristine, tmp_path):
    conf = runs.student_config("unused", epochs=1)
    conf["teacher"] = {"source": "store", "store": str(pristine)}
    conf["loss"] = [{"name": "kd", "temperature": 1.0}, {"name": "kd", "temperature": 2.0}]
    with pytest.warns(UserWarning) as seen:
        kdcore.train(conf, tmp_path / "run", quiet=True)
    messages = [str(w.message) for w in seen if "draws" in str(w.message)]
    assert messages == [f"teacher.store: {pristine} holds draws from the teacher (kdcore capture --sample), whose "
                        "gradient is unbiased only for kd at temperature 1; loss[1] trains on an approximation "
                        "(docs/signals.md)"]


def test_a_term_infinite_on_draws_is_refused(pristine, tmp_path, capsys):
    """A reverse KL needs the teacher's mass everywhere: against draws (none off the drawn ids)
    it is infinite, so the run is refused before it starts."""
    conf = runs.student_config("unused", epochs=1)
    conf["teacher"] = {"source": "store", "store": str(pristine)}
    conf["loss"] = [{"name": "ce"}, {"name": "kd", "temperature": 1.0, "divergence": "rkl"}]
    code, err = runs.cli(capsys, "train", str(runs.write(tmp_path / "rkl.toml", conf)), "--out", str(tmp_path / "r"))
    assert (code, runs.one_line(err)) == (2, f"kdcore: error: loss[1]: its loss is infinite against teacher.store "
                                             f"{pristine}, which holds draws from the teacher (no mass off the drawn "
                                             "ids, e.g. for a reverse KL); use a top-k store (kdcore capture --top-k) "
                                             "or the running teacher")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_trainable_transform_with_a_lazy_parameter_trains_from_draws(pristine, tmp_path):
    """The check for terms infinite on draws probes a copy of the loss: ctkd's per-instance
    MLP (a lazy layer) still takes its width from the run's inputs, and the run trains."""
    conf = runs.student_config("unused", epochs=1)
    conf["teacher"] = {"source": "store", "store": str(pristine)}
    conf["loss"] = [{"name": "ce"}, {"name": "kd", "temperature": 1.0,
                                     "transforms": [{"name": "ctkd", "mode": "instance", "hidden": 4}]}]
    with pytest.warns(UserWarning, match="draws"):
        out = kdcore.train(conf, tmp_path / "run", quiet=True)
    assert math.isfinite(out["final"]["loss/kd"])
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["losses"]
    first = next(v for k, v in last.items() if k.endswith("weight") and v.dim() == 2)
    assert first.shape[1] == 2 * (K + 1)  # the two sides over the store's K + 1 buckets (not the probe's)


def test_a_capture_continues_a_store_in_the_format_its_manifest_says(pristine, tmp_path):
    """Whether positions whose target is -100 are left out is the manifest's value, not the
    presence of its key: a version-1 store being finished says false there, and stays so."""
    from kdcore.engine.capture_resume import drops_ignored

    assert drops_ignored(tmp_path / "new")  # no store yet: the current format
    root = tmp_path / "store"
    shutil.copytree(pristine, root)
    manifest = json.loads((root / "manifest.json").read_text())
    for value in (False, True):
        (root / "manifest.json").write_text(json.dumps({**manifest, store.DROPS: value}))
        assert drops_ignored(root) is value
