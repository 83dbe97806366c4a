"""Token-level teacher stores (docs/signals.md): positions whose target is -100 are not stored
(bytes counted), a store keeping every id trains like the running teacher with those positions
left out, a sampled store captured from the command line trains end to end, a target at a
position the store holds nothing for is refused, and a store of format version 1 (every
position stored, written by kdcore before these changes, kept in tests/data) still reads and
trains."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import kdcore
from kdcore.cli import main
from kdcore.common.errors import RunFailure
from kdcore.engine.batches import Batch
from kdcore.engine.capture import capture
from kdcore.engine.teacher_source import StoreTeacher
from kdcore.signals import store

spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).resolve().parents[3] / "tests"
                                              / "helpers_runs.py")
runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runs)

DATA_DIR = Path(__file__).with_name("data")
SYNTH = {"n": 120, "length": 10, "vocab_size": 24, "states": 4}
MODEL = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1}
#: a dataset of synthetic_lm whose training targets hold -100: a 3-token prompt in every
#: sequence, and 2 tokens of padding at the end of every other one
MASKED = '''
import kdcore
from kdcore.data import DataSplits, TensorSplit


def make(**params):
    data = kdcore.create("dataset", "synthetic_lm", **params)
    y = data.train.targets.clone()
    y[:, :3] = -100
    y[1::2, -2:] = -100
    train = TensorSplit(data.train.inputs, y)
    return DataSplits(train, data.val, data.test, num_classes=data.num_classes, input_shape=data.input_shape,
                      meta=data.meta)
'''


def _config(checkpoint: str | None, **teacher) -> dict:
    conf = {"run": {"seed": 1, "epochs": 1, "batch_size": 16, "progress": "off"},
            "data": {"name": "python:masked_lm:make", **SYNTH},
            "student": {"backbone": "hf", "config": dict(MODEL)},
            "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0},
            "loss": [{"name": "kd", "temperature": 1.0}]}
    if checkpoint is not None:
        conf["teacher"] = {"backbone": "hf", "config": dict(MODEL), "checkpoint": checkpoint}
    if teacher:
        conf["teacher"] = teacher
    return conf


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder with the masked dataset, a trained teacher and the kd config that names it."""
    root = tmp_path_factory.mktemp("masked_lm")
    (root / "masked_lm.py").write_text(MASKED)
    teacher = {**_config(None), "loss": [{"name": "ce"}]}
    kdcore.train(runs.write(root / "teacher.toml", teacher), root / "teacher", quiet=True)
    runs.write(root / "kd.toml", _config(str(root / "teacher" / "checkpoints" / "best.pt")))
    return root


def _targets(folder) -> torch.Tensor:
    import sys

    sys.path.insert(0, str(folder))
    try:
        from masked_lm import make
    finally:
        sys.path.remove(str(folder))
    return make(**SYNTH).train.targets


def test_positions_whose_target_is_minus_100_are_not_stored(folder):
    root = folder / "topk"
    m = capture(folder / "kd.toml", root, top_k=4, shard_samples=50, quiet=True)
    y = _targets(folder)
    kept = y != -100
    n, length = y.shape
    assert (m["drops_ignored"], m["n"], m["positions"]) == (True, n, length)
    assert 0 < kept.sum() < kept.numel()
    record = m["layout"]["record_bytes"]
    bitmaps = n * math.ceil(length / 8)  # one bitmap of stored positions per sample
    assert m["stored_positions"] == int(kept.sum())
    assert m["total_bytes"] == sum((root / f"shard-{j:05d}.bin").stat().st_size for j in range(m["shards"]))
    assert m["total_bytes"] == bitmaps + int(kept.sum()) * record
    reader = store.StoreReader.open(root)
    assert torch.equal(reader.kept(torch.arange(n)), kept)
    ids, logp, rest = reader.read(torch.arange(n))
    assert torch.isfinite(logp).all() and torch.isfinite(rest).all()
    # the stored positions hold the teacher's top 4: their mass below 1, the tail's above 0
    assert (logp[kept].exp().sum(-1) + rest[kept].exp() - 1).abs().max() < 1e-3


def test_a_store_keeping_every_id_trains_like_the_running_teacher(folder, tmp_path):
    """Every id kept (float32): the run from the store, whose -100 positions hold placeholders,
    equals the run with the teacher model, which computes them."""
    root = tmp_path / "all"
    capture(folder / "kd.toml", root, top_k=SYNTH["vocab_size"], quiet=True)
    online = kdcore.train(folder / "kd.toml", tmp_path / "online", quiet=True)
    conf = _config(None, source="store", store=str(root))
    stored = kdcore.train(runs.write(folder / "from_all.toml", conf), tmp_path / "stored", quiet=True)
    assert math.isclose(online["final"]["loss/kd"], stored["final"]["loss/kd"], rel_tol=1e-4)
    assert math.isclose(online["final"]["val_kl"], stored["final"]["val_kl"], rel_tol=1e-4)


def test_a_sampled_store_from_the_command_line_trains(folder, tmp_path, capsys):
    root = tmp_path / "sampled"
    code = main(["capture", str(folder / "kd.toml"), "--out", str(root), "--sample", "16", "--quiet"])
    assert code == 0
    m = json.loads((root / "manifest.json").read_text())
    stored = int((_targets(folder) != -100).sum())
    # 16 draws of 24 ids: Elias-Fano with 0 low bits, 16 + 23 bits: 5 bytes a stored position
    assert (m["kind"], m["k"], m["layout"]["record_bytes"], m["stored_positions"]) == ("sample", 16, 5, stored)
    capsys.readouterr()
    assert main(["capture", str(folder / "kd.toml"), "--out", str(root), "--sample", "16"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"store {root}: {m['n']} samples x 10 position(s), K = 16 draws from the "
        f"teacher over 24 classes, 5 bytes per position; {stored} positions stored (those whose target is not -100)")
    conf = _config(None, source="store", store=str(root))
    out = kdcore.train(runs.write(folder / "from_sampled.toml", conf), tmp_path / "run", quiet=True)
    assert math.isfinite(out["final"]["loss/kd"]) and out["final"]["loss/kd"] > 0


def test_a_target_where_the_store_holds_no_teacher_is_refused(folder, tmp_path):
    root = tmp_path / "topk"
    capture(folder / "kd.toml", root, top_k=4, quiet=True)
    source = StoreTeacher(store.StoreReader.open(root), torch.device("cpu"))
    y = _targets(folder)[[4, 5]].clone()
    source(Batch({}, y, torch.tensor([4, 5])), {}, ())  # the capture's targets: fine
    y[1, 0] = 7  # a prompt position of sample 5 given a target
    with pytest.raises(RunFailure) as exc:
        source(Batch({}, y, torch.tensor([4, 5])), {}, ())
    assert str(exc.value) == (f"teacher.store: {root} holds no teacher at position 0 of training sample 5, whose "
                              "target is not -100 (it was captured from other targets); capture the store again "
                              "from this data")


def test_a_store_of_format_version_1_reads_and_trains(tmp_path):
    """tests/data/store_v1_lm: top 4 of 32 ids (uint8) of a tiny llama teacher on synthetic_lm
    (n = 24, length 8), every position stored, written by kdcore 0.1 before sampled stores;
    store_v1_lm_expected.pt: what that kdcore's reader read from it."""
    root = DATA_DIR / "store_v1_lm"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["version"] == 1 and "kind" not in manifest and "drops_ignored" not in manifest
    reader = store.StoreReader.open(root)
    want = torch.load(DATA_DIR / "store_v1_lm_expected.pt", weights_only=True)
    got = reader.read(torch.arange(reader.n))
    assert all(torch.equal(a, want[key]) for a, key in zip(got, ("ids", "logp", "rest")))
    assert bool(reader.kept(torch.arange(reader.n)).all())
    conf = {"run": {"seed": 1, "epochs": 1, "batch_size": 8, "progress": "off"},
            "data": {"name": "synthetic_lm", "n": 24, "length": 8, "vocab_size": 32, "states": 4},
            "teacher": {"source": "store", "store": str(root)},
            "student": {"backbone": "hf", "config": dict(MODEL)},
            "optim": {"name": "adamw", "lr": 1e-3}, "loss": [{"name": "kd", "temperature": 1.0}]}
    out = kdcore.train(conf, tmp_path / "run", quiet=True)
    assert math.isfinite(out["final"]["loss/kd"])
    assert (root / "shard-00002.bin").stat().st_size == 2 * 8 * 17  # 2 samples x 8 positions, no bitmaps
