"""Several teachers (``[teachers.NAME]``): the config's rules, each term bound to its
teacher, ensembles against the same average computed by hand, a stored teacher beside a
running one, resume, and ``kdcore capture --teacher``."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import kdcore
from kdcore.engine import build_model, build_trainer
from kdcore.engine.batches import epoch_generator
from kdcore.engine.teachers import ensemble_outputs
from kdcore.losses.outputs import Outputs

_spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).with_name("helpers_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)

#: the two teachers of these tests: different widths and depths
HIDDEN = {"a": [32], "b": [16, 16]}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, str]:
    """Two teachers of different architectures trained for one epoch: name -> checkpoint."""
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for name, hidden in HIDDEN.items():
        conf = runs.teacher_config(epochs=1)
        conf["student"]["hidden"] = hidden
        kdcore.train(conf, root / name, quiet=True)
        out[name] = str(root / name / "checkpoints" / "last.pt")
    return out


def two_teacher_config(checkpoints: dict[str, str], loss: list[dict], epochs: int = 1) -> dict:
    """A student distilled from teachers a and b with the terms ``loss``."""
    conf = runs.student_config(checkpoints.get("a", "a.pt"), epochs=epochs)
    del conf["teacher"]
    conf["student"]["dropout"] = 0.0
    conf["teachers"] = {n: {"backbone": "mlp", "hidden": HIDDEN[n], "checkpoint": checkpoints.get(n, f"{n}.pt")}
                        for n in HIDDEN}
    conf["loss"] = loss
    return conf


# -- the config's rules ---------------------------------------------------------------------------

KD_A, KD_B = {"name": "kd", "teacher": "a"}, {"name": "kd", "teacher": "b"}


def _with_teacher_table(conf):
    conf["teacher"] = dict(conf["teachers"]["a"])
    return conf


def _bad_name(conf):
    conf["teachers"]["a-1"] = conf["teachers"].pop("a")
    return conf


@pytest.mark.parametrize("change, message", [
    (_with_teacher_table, "teachers: a config has [teacher] (one teacher) or [teachers.NAME] tables, not both; "
                          "move [teacher] to [teachers.NAME] (e.g. [teachers.teacher])"),
    (_bad_name, "teachers.a-1: a teacher's name must be a simple identifier (letters, digits and _, not starting "
                "with a digit)"),
    (lambda c: {**c, "loss": [{"name": "ce"}, {"name": "kd"}, KD_B]},
     'loss[1].teacher: required with several teachers: name one of a, b (teacher = "NAME"), or several for an '
     "ensemble"),
    (lambda c: {**c, "loss": [KD_A, {"name": "kd", "teacher": "bb"}]},
     "loss[1].teacher: unknown teacher 'bb'; did you mean 'b' (teachers: a, b)"),
    (lambda c: {**c, "loss": [{"name": "ce"}, KD_A]},
     'teachers.b: no loss term uses teacher \'b\'; name it in a term (loss[1]: teacher = "b"), or remove the table'),
    (lambda c: {**c, "loss": [{"name": "ce", "teacher": "a"}, KD_A, KD_B]},
     "loss[0].teacher: loss 'ce' does not use a teacher; remove the key"),
    (lambda c: {**c, "loss": [{"name": "kd", "teacher": "a", "ensemble": "logits"}, KD_B]},
     'loss[0].ensemble: only for an ensemble (teacher = ["a", "b"])'),
    (lambda c: {**c, "loss": [{"name": "kd", "teacher": ["a", "b"], "ensemble": "median"}]},
     "loss[0].ensemble: must be one of 'probs', 'logits', got 'median'"),
    (lambda c: {**c, "loss": [{"name": "kd", "teacher": ["a", "b"], "teacher_weights": [1.0]}]},
     "loss[0].teacher_weights: must be 2 non-negative numbers (one per teacher, not all 0), got [1.0]"),
    (lambda c: {**c, "loss": [{"name": "kd", "teacher": ["a", "b"], "teacher_weights": [0, 0]}]},
     "loss[0].teacher_weights: must be 2 non-negative numbers (one per teacher, not all 0), got [0, 0]"),
    (lambda c: {**c, "loss": [{"name": "kd", "teacher": ["a", "a"]}, KD_B]},
     "loss[0].teacher: an ensemble is a list of two or more different teacher names, got ['a', 'a']"),
    (lambda c: {**c, "loss": [{"name": "fitnet", "teacher": ["a", "b"], "student_layers": "net.1",
                               "teacher_layers": "net.1"}]},
     "loss[0].teacher: an ensemble has no layers to tap, and this term taps the teacher's net.1; name one teacher"),
    (lambda c: {**c, "teachers": {**c["teachers"], "b": {"source": "store", "store": "nowhere"}},
                "loss": [{"name": "kd", "teacher": ["a", "b"]}]},
     "loss[0].teacher: 'b' is a stored teacher (top-k buckets, not whole distributions); an ensemble takes "
     "teachers with source = 'model'"),
    (lambda c: {**c, "batch_policy": {"name": "on_policy"}, "loss": [KD_A, KD_B]}, None),
])
def test_each_rule_of_several_teachers_is_one_line_and_exit_2(tmp_path, capsys, change, message):
    conf = change(two_teacher_config({}, [KD_A, KD_B]))
    if message is None:  # a batch policy needs one teacher (if one is installed)
        if "on_policy" not in kdcore.plugins.default_registry().available("batch_policy"):
            pytest.skip("no batch policy installed")
        message = "batch_policy: works with one teacher ([teacher]); this config has 2 ([teachers.NAME])"
    code, err = runs.cli(capsys, "train", str(runs.write(tmp_path / "c.toml", conf)), "--out", str(tmp_path / "r"))
    assert (code, runs.one_line(err)) == (2, f"kdcore: error: {message}")


@pytest.mark.parametrize("key, value, message", [
    ("checkpoint", "missing.pt", "teachers.b.checkpoint: file not found: missing.pt"),
    ("hiden", [17], "teachers.b.hiden: unknown parameter of backbone 'mlp' (accepted: dropout, hidden, in_features, "
                    "num_classes)"),
    ("store", "nowhere", "teachers.b.store: no teacher store at nowhere (make one with `kdcore capture`)"),
])
def test_a_teachers_own_mistake_names_its_table(teachers, tmp_path, capsys, monkeypatch, key, value, message):
    conf = two_teacher_config(teachers, [KD_A, KD_B])
    conf["teachers"]["b"][key] = value
    if key == "store":
        conf["teachers"]["b"]["source"] = "store"
    monkeypatch.chdir(tmp_path)
    code, err = runs.cli(capsys, "train", str(runs.write(tmp_path / "c.toml", conf)), "--out", str(tmp_path / "r"))
    assert (code, runs.one_line(err)) == (2, f"kdcore: error: {message}")


def test_a_teacher_whose_terms_all_weigh_0_does_not_run(teachers, tmp_path):
    trainer = build_trainer(two_teacher_config(teachers, [KD_A, {**KD_B, "weight": 0.0}]), tmp_path, quiet=True)
    calls = {n: 0 for n in HIDDEN}
    for n, model in trainer.teachers.items():
        model.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
    for batch in _first_batches(trainer, 2):
        trainer.train_step(batch)
    assert calls == {"a": 2, "b": 0}


def test_a_term_with_the_one_teacher_needs_no_name_and_the_config_round_trips(teachers):
    conf = two_teacher_config(teachers, [{"name": "kd", "teacher": ["a", "b"], "ensemble": "logits",
                                          "teacher_weights": [1, 3]}])
    conf["teachers"].pop("b")
    with pytest.raises(kdcore.ConfigError) as exc:
        kdcore.config.from_dict(copy.deepcopy(conf))
    assert str(exc.value) == "loss[0].teacher: unknown teacher 'b' (teachers: a)"
    conf["loss"] = [{"name": "ce"}, {"name": "kd"}]
    parsed = kdcore.config.from_dict(conf)
    assert kdcore.config.from_dict(kdcore.config.to_dict(parsed)) == parsed
    objective = kdcore.engine.Objective.from_config(parsed, kdcore.plugins.default_registry())
    assert [t.teachers for t in objective.terms] == [(), ("a",)]


# -- the terms' teachers, step for step -----------------------------------------------------------

def _kd64(student: torch.Tensor, teacher_logp: torch.Tensor, t: float) -> torch.Tensor:
    """``T^2 KL(p_t^T || q_s^T)``, the mean over rows, in float64 from teacher log-probabilities."""
    p_logp = torch.log_softmax(teacher_logp.double() / t, -1)
    q_logp = torch.log_softmax(student.double() / t, -1)
    return t * t * (p_logp.exp() * (p_logp - q_logp)).sum(-1).mean()


def _first_batches(trainer, n: int):
    return list(trainer.batches.epoch(epoch_generator(trainer.config.run.seed, 1)))[:n]


def test_each_term_uses_its_teacher_and_each_teacher_runs_once_per_step(teachers, tmp_path):
    """ce + kd(a, T=2) + kd(a, T=4) + kd(b, T=4): the losses of four steps equal those
    computed by hand from the two teacher models (built independently), and each
    teacher runs once per step however many terms use it."""
    loss = [{"name": "ce"}, {"name": "kd", "temperature": 2.0, "teacher": "a", "id": "kd_a2"},
            {"name": "kd", "temperature": 4.0, "teacher": "a", "id": "kd_a4"},
            {"name": "kd", "temperature": 4.0, "teacher": "b", "id": "kd_b4"}]
    conf = two_teacher_config(teachers, loss)
    trainer = build_trainer(conf, tmp_path / "run", quiet=True)
    parsed = trainer.config
    models = {n: build_model(parsed, f"teachers.{n}") for n in HIDDEN}
    calls = {n: 0 for n in HIDDEN}
    for n, model in trainer.teachers.items():
        model.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
    for i, batch in enumerate(_first_batches(trainer, 4), start=1):
        x = batch.inputs
        with torch.no_grad():
            s = trainer.student(x)
            t = {n: m(x) for n, m in models.items()}
        expected = {"ce": F.cross_entropy(s.double(), batch.target), "kd_a2": _kd64(s, t["a"], 2.0),
                    "kd_a4": _kd64(s, t["a"], 4.0), "kd_b4": _kd64(s, t["b"], 4.0)}
        got = trainer.train_step(batch)
        assert calls == {"a": i, "b": i}
        for k, v in expected.items():
            assert float(got[k].detach()) == pytest.approx(float(v), rel=1e-5, abs=1e-7), (i, k)


@pytest.mark.parametrize("cache", [False, True])
def test_run_compile_compiles_each_teacher_and_each_runs_compiled(teachers, tmp_path, monkeypatch, cache):
    """``run.compile``: the student and every teacher are compiled, and each teacher's source
    (running or cached) runs its own compiled module, once per step."""
    compiled, calls = [], {}

    class Compiled(torch.nn.Module):  # what torch.compile would return, counting its calls
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            calls[id(self.module)] = calls.get(id(self.module), 0) + 1
            return self.module(*args, **kwargs)

    def fake_compile(module):
        compiled.append(module)
        return Compiled(module)

    monkeypatch.setattr(torch, "compile", fake_compile)
    conf = two_teacher_config(teachers, [{"name": "ce"}, KD_A, KD_B])
    conf["run"]["compile"] = True
    for table in conf["teachers"].values():
        table["cache"] = cache
    trainer = build_trainer(conf, tmp_path / "run", quiet=True)
    assert [id(m) for m in compiled] == [id(trainer.student), id(trainer.teachers["a"]), id(trainer.teachers["b"])]
    batch = _first_batches(trainer, 1)[0]
    trainer.train_step(batch)
    assert calls[id(trainer.teachers["a"])] == 1 and calls[id(trainer.teachers["b"])] == 1


@pytest.mark.parametrize("ensemble, weights", [("probs", None), ("logits", None), ("probs", [1, 3]),
                                               ("logits", [3, 1]), ("probs", [0, 2])])
def test_an_ensemble_term_equals_the_average_computed_by_hand(teachers, tmp_path, ensemble, weights):
    term = {"name": "kd", "temperature": 1.0, "teacher": ["a", "b"], "ensemble": ensemble}
    if weights is not None:
        term["teacher_weights"] = weights
    trainer = build_trainer(two_teacher_config(teachers, [term]), tmp_path / "run", quiet=True)
    models = {n: build_model(trainer.config, f"teachers.{n}") for n in HIDDEN}
    w = torch.tensor(weights or [1, 1], dtype=torch.float64)
    w = w / w.sum()
    for batch in _first_batches(trainer, 2):
        with torch.no_grad():
            s = trainer.student(batch.inputs)
            za, zb = (models[n](batch.inputs).double() for n in ("a", "b"))
        if ensemble == "probs":  # the log of the weighted mean of the probabilities
            teacher = torch.log(w[0] * torch.softmax(za, -1) + w[1] * torch.softmax(zb, -1))
        else:
            teacher = w[0] * za + w[1] * zb
        got = trainer.train_step(batch)["kd"]
        assert float(got.detach()) == pytest.approx(float(_kd64(s, teacher, 1.0)), rel=1e-5, abs=1e-7)


def test_an_ensemble_several_terms_name_is_made_once_a_step(teachers, tmp_path, monkeypatch):
    """kd and dkd on the same ensemble, and a third term on another weighting: two ensembles a
    step, each equal to the one a term alone gets."""
    from kdcore.engine import teachers as binding

    made = []
    original = binding.ensemble_outputs
    monkeypatch.setattr(binding, "ensemble_outputs", lambda *a, **k: (made.append(a[1:]), original(*a, **k))[1])
    both = {"teacher": ["a", "b"]}
    loss = [{"name": "kd", **both}, {"name": "dkd", **both},
            {"name": "kd", "temperature": 2.0, "teacher_weights": [1, 3], **both, "id": "kd_w"}]
    trainer = build_trainer(two_teacher_config(teachers, loss), tmp_path / "run", quiet=True)
    batch = _first_batches(trainer, 1)[0]
    got = trainer.train_step(batch)
    assert made == [("probs", None), ("probs", (0.25, 0.75))]  # kd and dkd share the first
    alone = build_trainer(two_teacher_config(teachers, [loss[1]]), tmp_path / "alone", quiet=True)
    assert float(alone.train_step(batch)["dkd"].detach()) == pytest.approx(float(got["dkd"].detach()), rel=1e-6)


def test_an_ensemble_of_token_level_outputs_and_fused_outputs_is_the_same_average():
    """``[B, T, V]`` logits (positions with target -100 are the loss's business, not the
    ensemble's) and a teacher that gives ``Outputs(hidden, head)`` (its logits computed)."""
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(2, 5, 7, generator=g), 3 * torch.randn(2, 5, 7, generator=g)
    head = torch.nn.Linear(4, 7)
    hidden = torch.randn(2, 5, 4, generator=g)
    with torch.no_grad():
        zc = head(hidden)
    got = ensemble_outputs([Outputs(za), Outputs(hidden=hidden, head=head)], "probs", [0.25, 0.75]).logits
    want = torch.log(0.25 * torch.softmax(za.double(), -1) + 0.75 * torch.softmax(zc.double(), -1))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    got = ensemble_outputs([Outputs(za), Outputs(zb)], "logits").logits
    torch.testing.assert_close(got, (za + zb) / 2)
    assert torch.softmax(ensemble_outputs([Outputs(za), Outputs(zb)]).logits, -1).sum(-1).sub(1).abs().max() < 1e-6


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(1e-3, 1e4), reduction=st.sampled_from(["probs", "logits"]),
       w=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_an_ensemble_is_finite_with_finite_gradients_on_extreme_logits(scale, reduction, w, seed):
    g = torch.Generator().manual_seed(seed)
    za = (scale * torch.randn(3, 6, generator=g)).requires_grad_()
    zb = (scale * torch.randn(3, 6, generator=g)).requires_grad_()
    weights = [w, 1.0 - w] if 0 < w < 1 else None
    out = ensemble_outputs([Outputs(za), Outputs(zb)], reduction, weights).logits
    assert torch.isfinite(out).all()
    torch.log_softmax(out, -1).sum().backward()
    assert torch.isfinite(za.grad).all() and torch.isfinite(zb.grad).all()


# -- store, resume, capture -----------------------------------------------------------------------

def test_a_stored_teacher_beside_a_running_one_equals_both_running(teachers, tmp_path, capsys):
    """Teacher b captured with ``kdcore capture --teacher b`` (every class kept: the store
    equals the online teacher) trains like teacher b running; the summary evaluates a."""
    loss = [{"name": "ce"}, KD_A, KD_B]
    online = runs.write(tmp_path / "online.toml", two_teacher_config(teachers, loss))
    code, err = runs.cli(capsys, "capture", str(online), "--out", str(tmp_path / "store"), "--top-k", "3",
                         "--teacher", "b", "--quiet")
    assert code == 0, err
    stored = two_teacher_config(teachers, loss)
    stored["teachers"]["b"].update(source="store", store=str(tmp_path / "store"))
    want = kdcore.train(online, tmp_path / "r1", quiet=True)
    got = kdcore.train(stored, tmp_path / "r2", quiet=True)
    for k in ("loss/ce", "loss/kd_1", "loss/kd_2"):
        assert got["final"][k] == pytest.approx(want["final"][k], rel=1e-5)
    assert got["test_acc"] == want["test_acc"] and list(got["teachers"]) == ["a"]
    assert got["teachers"]["a"] == want["teachers"]["a"]


def test_capture_of_a_config_with_several_teachers_names_one(teachers, tmp_path, capsys):
    path = runs.write(tmp_path / "c.toml", two_teacher_config(teachers, [KD_A, KD_B]))
    code, err = runs.cli(capsys, "capture", str(path), "--out", str(tmp_path / "s"))
    assert (code, runs.one_line(err)) == (2, f"kdcore: error: --teacher: {path} has 2 teachers (a, b); name the "
                                             "one to capture with --teacher NAME")
    code, err = runs.cli(capsys, "capture", str(path), "--out", str(tmp_path / "s"), "--teacher", "c")
    assert (code, runs.one_line(err)) == (2, "kdcore: error: --set 'teacher=c': unknown teacher 'c' (teachers: a, b)")
    assert not (tmp_path / "s").exists()


def test_a_resumed_two_teacher_run_ends_as_an_uninterrupted_one(teachers, tmp_path):
    conf = two_teacher_config(teachers, [{"name": "ce"}, KD_A, {"name": "kd", "teacher": ["a", "b"]}], epochs=2)
    whole = kdcore.train(conf, tmp_path / "whole", quiet=True)
    kdcore.train(conf, tmp_path / "part", ["run.epochs=1"], quiet=True)
    resumed = kdcore.train(conf, tmp_path / "part", resume=True, quiet=True)
    assert resumed["final"] == {**whole["final"], "epoch_time_s": resumed["final"]["epoch_time_s"]}
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True)["model"] for d in ("whole", "part"))
    for k, v in a.items():
        assert torch.equal(b[k], v), k


def test_the_summary_and_the_done_line_report_each_teacher(teachers, tmp_path, capsys):
    path = runs.write(tmp_path / "c.toml", two_teacher_config(teachers, [{"name": "ce"}, KD_A, KD_B]))
    capsys.readouterr()
    assert kdcore.cli.main(["train", str(path), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    line = capsys.readouterr().out.strip()
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert set(summary["teachers"]) == {"a", "b"} and "teacher_test_acc" not in summary
    for name, m in summary["teachers"].items():
        assert set(m) == {"test_acc", "test_nll", "test_tv", "test_l2", "test_kl", "test_agreement"}
        assert f"teacher {name} test_acc {m['test_acc']:.4f} (tv to the truth {m['test_tv']:.4f})" in line
    assert line.startswith(f"done: student test_acc {summary['test_acc']:.4f}")


TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun not installed")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_ranks_with_two_teachers_equal_one_process(teachers, tmp_path, strategy):
    """Each rank runs both (frozen, unwrapped) teachers on its rows, the student wrapped by
    DDP or sharded by FSDP: the logged step losses and the weights equal one process's,
    and the summary's teachers are rank 0's."""
    conf = two_teacher_config(teachers, [{"name": "ce"}, KD_A, {"name": "kd", "teacher": ["a", "b"]}], epochs=1)
    conf["run"].update(device="cpu", log_every=1, strategy=strategy)
    path = runs.write(tmp_path / "s.toml", conf)
    one = kdcore.train(path, tmp_path / "one", quiet=True)
    out = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "kdcore", "train", str(path),
                          "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(out.stdout.splitlines()) == 1 and "teacher a test_acc" in out.stdout, out.stdout
    steps = [[json.loads(line) for line in (tmp_path / run / "steps.jsonl").read_text().splitlines()]
             for run in ("one", "two")]
    assert len(steps[0]) == len(steps[1]) == one["steps"]
    for a, b in zip(*steps):
        for k in (k for k in a if k.startswith("loss/")):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    for name in HIDDEN:
        assert two["teachers"][name]["test_acc"] == pytest.approx(one["teachers"][name]["test_acc"])
        assert two["teachers"][name]["test_agreement"] == pytest.approx(one["teachers"][name]["test_agreement"],
                                                                        abs=1e-4)
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True)["model"] for d in ("one", "two"))
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-4, atol=1e-5)


def test_an_ensemble_knows_the_positions_every_teacher_knows():
    """A teacher that knows only some positions (``Outputs.known``, a cross-tokenizer
    teacher) in an ensemble: the ensemble's positions are those all its teachers know, and a
    term over them equals kd on those positions alone, whatever the logits elsewhere."""
    from kdcore.engine.objective import Term

    g = torch.Generator().manual_seed(1)
    za, zb, zs = (torch.randn(2, 5, 7, generator=g) for _ in range(3))
    known_a = torch.tensor([[True, False, True, True, True], [True, True, True, False, True]])
    y = torch.randint(0, 7, (2, 5), generator=g)
    out = ensemble_outputs([Outputs(za, known=known_a), Outputs(zb)])
    assert torch.equal(out.known, known_a)
    both = ensemble_outputs([Outputs(za, known=known_a), Outputs(zb, known=known_a.flip(1))]).known
    assert torch.equal(both, known_a & known_a.flip(1))
    assert ensemble_outputs([Outputs(za), Outputs(zb)]).known is None

    kd = kdcore.create("loss", "kd")
    values = []
    for garbage in (0.0, 1e4):
        noisy = torch.where(known_a.unsqueeze(-1), za, garbage * torch.randn(2, 5, 7, generator=g))
        term = Term("kd", kd, 1.0, teachers=("a", "b"))
        values.append(term(Outputs(zs), {"a": Outputs(noisy, known=known_a), "b": Outputs(zb)}, y))
    mean = torch.log((torch.softmax(za, -1) + torch.softmax(zb, -1)) / 2)
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(values[0], kd(zs, mean, y.masked_fill(~known_a, -100)))


def test_a_term_over_all_rows_skips_the_positions_its_teacher_does_not_know():
    """``rows = "all"`` calls the loss without targets; a teacher's unknown positions are
    still left out (the mean is over the positions it knows)."""
    from kdcore.engine.objective import Term

    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    known = torch.rand(3, 4, generator=g) > 0.4
    y = torch.full((3, 4), -100)  # a transfer set: no labels
    kd = kdcore.create("loss", "kd", temperature=2.0)
    got = Term("kd", kd, 1.0, rows="all")(Outputs(zs), Outputs(zt, known=known), y)
    want = kd(zs[known], zt[known], None)
    torch.testing.assert_close(got, want)
    assert Term("kd", kd, 1.0, rows="all")(Outputs(zs), Outputs(zt), y) == pytest.approx(float(kd(zs, zt, None)))
