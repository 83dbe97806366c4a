"""``kdcore capture``: resumable, refuses other captures, and token-level stores
(``synthetic_lm`` from kdcore-lm) that train like the online teacher."""

from __future__ import annotations

import copy
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch

import kdcore
from kdcore.engine import build_trainer
from kdcore.engine.capture import capture
from kdcore.signals import store

spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).parent / "helpers_runs.py")
runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runs)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("capture")
    kdcore.train(runs.teacher_config(1), root / "teacher", quiet=True)
    conf = runs.student_config(str(root / "teacher" / "checkpoints" / "best.pt"), epochs=1)
    path = root / "student.toml"
    path.write_text(tomli_w.dumps(conf))
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_an_interrupted_capture_resumes_to_the_same_store(config, tmp_path, monkeypatch):
    whole = capture(config, tmp_path / "whole", top_k=2, shard_samples=100, quiet=True)
    assert whole["shards"] == 6 and whole["complete"]
    written = []
    real = store.write_shard

    def dies_after_two(root, j, records):
        if len(written) == 2:
            raise KeyboardInterrupt  # as if killed while computing the third shard
        written.append(j)
        real(root, j, records)

    monkeypatch.setattr(store, "write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        capture(config, tmp_path / "cut", top_k=2, shard_samples=100, quiet=True)
    monkeypatch.setattr(store, "write_shard", real)
    assert sorted(p.name for p in (tmp_path / "cut").glob("shard-*")) == ["shard-00000.bin", "shard-00001.bin"]
    with pytest.raises(kdcore.ConfigError, match="not complete"):
        store.StoreReader.open(tmp_path / "cut")
    done = []
    monkeypatch.setattr(store, "write_shard", lambda root, j, rec: (done.append(j), real(root, j, rec)))
    capture(config, tmp_path / "cut", top_k=2, shard_samples=100, quiet=True)
    assert done == [2, 3, 4, 5]  # the finished shards were kept
    assert _files(tmp_path / "cut") == _files(tmp_path / "whole")


def test_a_store_of_another_capture_is_not_overwritten(config, tmp_path):
    capture(config, tmp_path / "s", top_k=2, quiet=True)
    with pytest.raises(kdcore.ConfigError, match=r"^--out: .* another 'k'"):
        capture(config, tmp_path / "s", top_k=3, quiet=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(kdcore.ConfigError, match=r"^--out: .*no teacher store"):
        capture(config, tmp_path / "other", quiet=True)
    again = capture(config, tmp_path / "s", top_k=2, quiet=True)  # complete: nothing to do
    assert again["complete"]


def test_the_command_line(config, tmp_path, capsys):
    from kdcore.cli import main

    cmd = [sys.executable, "-m", "kdcore", "capture", str(config), "--out", str(tmp_path / "s")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "k = 3 of 3, 13 bytes per position" in done.stdout  # 1 byte of ids, 3 float32 values
    capsys.readouterr()
    assert main(["capture", str(config), "--out", str(tmp_path / "t"), "--top-k", "9", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kdcore: error: --top-k:")
    assert main(["capture", str(config), "--out", str(tmp_path / "t"), "--set", "teacher.source=store"]) == 2
    assert "teacher.store" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()  # nothing written for a refused capture


# -- token level --------------------------------------------------------------------------------
TOKEN_MODEL = '''
import torch
from torch import nn
import kdcore


class TinyLM(nn.Module):
    """Embedding, one tanh layer over the previous and current token, a vocabulary head."""

    def __init__(self, num_classes, hidden=16):
        super().__init__()
        self.embed = nn.Embedding(num_classes, hidden)
        self.mix = nn.Linear(2 * hidden, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, input_ids):
        e = self.embed(input_ids)
        prev = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], 1)
        return kdcore.Outputs(hidden=torch.tanh(self.mix(torch.cat([e, prev], -1))), head=self.head)
'''


@pytest.fixture(scope="module")
def lm_config(tmp_path_factory):
    if "synthetic_lm" not in kdcore.available("dataset"):
        pytest.skip("kdcore-lm (synthetic_lm) is not installed")
    root = tmp_path_factory.mktemp("capture_lm")
    (root / "tiny_lm.py").write_text(TOKEN_MODEL)
    sys.path.insert(0, str(root))
    try:
        from tiny_lm import TinyLM
    finally:
        sys.path.remove(str(root))
    torch.manual_seed(0)
    teacher = TinyLM(24, hidden=32)
    torch.save(teacher.state_dict(), root / "teacher.pt")
    conf = {
        "run": {"seed": 0, "epochs": 2, "batch_size": 16, "progress": "off"},
        "data": {"name": "synthetic_lm", "n": 96, "length": 8, "vocab_size": 24, "states": 6},
        "teacher": {"backbone": "python:tiny_lm:TinyLM", "hidden": 32, "checkpoint": str(root / "teacher.pt")},
        "student": {"backbone": "python:tiny_lm:TinyLM", "hidden": 8},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
        "loss": [{"name": "ce"}, {"name": "kd", "temperature": 2.0, "chunk_size": 40}],
    }
    path = root / "lm.toml"
    path.write_text(tomli_w.dumps(conf))
    return path, conf, teacher


def _weights(trainer):
    return torch.cat([p.detach().reshape(-1) for p in trainer.student.parameters()])


def test_token_level_full_store_trains_like_the_online_teacher(lm_config, tmp_path):
    path, conf, _ = lm_config
    manifest = capture(path, tmp_path / "store", top_k=24, quiet=True)
    assert manifest["positions"] == 8 and manifest["target_shape"] == [8]
    stored = copy.deepcopy(conf)
    stored["teacher"].update(source="store", store=str(tmp_path / "store"))
    path2 = path.parent / "lm_store.toml"
    path2.write_text(tomli_w.dumps(stored))
    trained = []
    for p in (path, path2):
        trainer = build_trainer(p, None, quiet=True)
        trainer.fit()
        trained.append(trainer)
    assert torch.allclose(_weights(trained[0]), _weights(trained[1]), atol=1e-5)


def test_token_level_top_k_store_tail_and_training(lm_config, tmp_path):
    path, conf, teacher = lm_config
    capture(path, tmp_path / "store", top_k=5, quiet=True)
    reader = store.StoreReader.open(tmp_path / "store")
    data = kdcore.create("dataset", "synthetic_lm", **{k: v for k, v in conf["data"].items() if k != "name"})
    index = torch.tensor([0, 17, 85])
    ids, logp, rest = reader.read(index)
    with torch.no_grad():
        out = teacher(data.train.inputs["input_ids"][index])
        p = torch.softmax(out.head(out.hidden).double(), -1)  # the float64 reference
    kept = p.gather(-1, ids)
    assert torch.allclose(kept.sum(-1), p.topk(5, -1).values.sum(-1), atol=1e-12)  # the top 5
    lp_err = (logp.double() - kept.log()).abs()
    assert lp_err.max() < 0.1 and (lp_err * kept).sum(-1).max() < 0.02  # uint8 codes
    assert torch.allclose(rest.double(), torch.log1p(-kept.sum(-1)), atol=1e-5)
    stored = copy.deepcopy(conf)
    stored["teacher"] = {"source": "store", "store": str(tmp_path / "store")}
    path2 = path.parent / "lm_topk.toml"
    path2.write_text(tomli_w.dumps(stored))
    summary = kdcore.train(path2, tmp_path / "run", quiet=True)
    assert all(math.isfinite(v) for k, v in summary["final"].items() if k.startswith("loss/"))


def test_a_term_over_all_rows_is_refused_against_a_store_without_the_ignored_positions(lm_config, tmp_path,
                                                                                         capsys):
    """A token-level store leaves out the positions whose target is -100; a term with
    ``rows = "all"`` would train there on placeholders, so the run is refused (exit 2)."""
    path, conf, _ = lm_config
    capture(path, tmp_path / "store", top_k=5, quiet=True)
    stored = copy.deepcopy(conf)
    stored["teacher"] = {"source": "store", "store": str(tmp_path / "store")}
    stored["loss"] = [{"name": "ce"}, {"name": "kd", "rows": "all"}]
    code, err = runs.cli(capsys, "train", str(runs.write(tmp_path / "all.toml", stored)), "--out", str(tmp_path / "r"))
    assert (code, runs.one_line(err)) == (
        2, f"kdcore: error: loss[1].rows: 'all' trains at positions whose target is -100, which teacher.store "
           f"{tmp_path / 'store'} does not hold (kdcore capture leaves them out); train with the running teacher "
           "(source = \"model\") or with rows = \"labelled\"")


def test_the_store_example_pair_runs(tmp_path, monkeypatch):
    """examples/store_kd.toml from a capture of examples/kd.toml (shortened) equals examples/kd.toml."""
    examples = Path(__file__).resolve().parent.parent / "examples"
    small = ["data.n=600", "run.batch_size=32", "run.epochs=1"]
    monkeypatch.chdir(tmp_path)
    kdcore.train(examples / "teacher.toml", tmp_path / "runs" / "teacher", small, quiet=True)
    capture(examples / "kd.toml", tmp_path / "runs" / "kd_store", small, quiet=True)
    online = kdcore.train(examples / "kd.toml", tmp_path / "runs" / "kd", small, quiet=True)
    stored = kdcore.train(examples / "store_kd.toml", tmp_path / "runs" / "store_kd", small, quiet=True)
    assert stored["test_acc"] > 0.4
    assert math.isclose(stored["final"]["loss/kd"], online["final"]["loss/kd"], rel_tol=1e-4)


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun not installed")
@pytest.mark.parametrize("flag, kind", [("--top-k", "top_k"), ("--sample", "sample")])
def test_two_ranks_write_the_store_of_one_process(config, tmp_path, flag, kind):
    """The shards of a two-rank capture are the bytes of one process's, for the top k and for
    draws (seeded by sample, whichever rank draws them)."""
    import os

    capture(config, tmp_path / "one", **{kind: 2}, shard_samples=100, quiet=True)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "kdcore", "capture", str(config),
                           "--out", str(tmp_path / "two"), flag, "2", "--shard-samples", "100", "--quiet",
                           "--set", "run.device=cpu"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = _files(tmp_path / "one")
    two = _files(tmp_path / "two")
    assert one.keys() == two.keys()
    assert all(one[k] == two[k] for k in one if k.startswith("shard-"))


def test_a_killed_capture_process_resumes(config, tmp_path):
    """SIGKILL while shards are being written; the same command then finishes the store."""
    import signal
    import time

    cmd = [sys.executable, "-m", "kdcore", "capture", str(config), "--out", str(tmp_path / "cut"), "--top-k", "2",
           "--shard-samples", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "cut").glob("shard-*.bin"))) < 5 and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = store.read_manifest(tmp_path / "cut", "--out")
    if manifest["complete"]:
        pytest.skip("the capture finished before it could be killed")
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    capture(config, tmp_path / "whole", top_k=2, shard_samples=1, quiet=True)
    assert _files(tmp_path / "cut") == _files(tmp_path / "whole")


class _CountingBar:
    """A stand-in for tqdm that records its total, its start and every update."""

    made: list[_CountingBar] = []

    def __init__(self, *, total, initial, **_):
        self.total, self.initial, self.updates = total, initial, []
        _CountingBar.made.append(self)

    def update(self, n):
        self.updates.append(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_progress_bar_moves_per_batch_and_a_resume_starts_at_what_is_done(config, tmp_path, monkeypatch):
    """Shards of 100 samples in batches of 25: the bar counts samples and moves after every
    batch, not once per shard; a resumed capture's bar starts at the kept shards' samples."""
    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", _CountingBar)
    monkeypatch.setattr(_CountingBar, "made", [])
    whole = capture(config, tmp_path / "whole", top_k=2, shard_samples=100, batch_size=25)
    (bar,) = _CountingBar.made
    assert bar.total == whole["n"] == 540 and bar.initial == 0
    assert bar.updates == [25] * 20 + [25, 15]  # the last shard holds 40 samples
    for j in (2, 3, 4, 5):  # as if killed after two shards
        (tmp_path / "whole" / store.shard_name(j)).unlink()
    capture(config, tmp_path / "whole", top_k=2, shard_samples=100, batch_size=25)
    resumed = _CountingBar.made[1]
    assert resumed.total == 540 and resumed.initial == 200 and resumed.updates == [25] * 12 + [25, 15]
