"""A teacher store's integrity (docs/signals.md, "Integrity"): each fault is injected into a
real capture (a flipped byte, a truncated or deleted shard, a record holding a NaN, a positive
log-probability, a repeated or out-of-range id, a manifest without 'shards', an interrupted
capture) and the exact one-line message and exit status are checked, then the same capture
repairs the store; and the teacher cache's spill file on a full disk."""

from __future__ import annotations

import copy
import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import tomllib
import uuid
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch

import kdcore
from kdcore.cli import main
from kdcore.common.errors import RunFailure
from kdcore.engine import capture as capture_module
from kdcore.engine import teacher_cache
from kdcore.engine.capture import capture
from kdcore.signals import store
from kdcore.signals.records import Layout, VALUE_CODINGS, check_values, choose_layout, decode, encode, top_k

spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).parent / "helpers_runs.py")
runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runs)

#: 600 classes: k = 4 of them are Elias-Fano coded (ids can repeat or leave the vocabulary),
#: and the cache of 540 training samples' logits (1.3 MB) spills beyond a 1 MiB budget
DATA = {"name": "gaussian_mixture", "n": 600, "num_classes": 600}
K, PER = 4, 100  # 540 training samples: shards of samples 0..99, ..., 500..539


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    teacher = runs.teacher_config(1)
    teacher["data"] = dict(DATA)
    kdcore.train(teacher, root / "teacher", quiet=True)
    conf = runs.student_config(str(root / "teacher" / "checkpoints" / "best.pt"), epochs=1)
    conf["data"] = dict(DATA)
    path = root / "student.toml"
    path.write_text(tomli_w.dumps(conf))
    return path


@pytest.fixture(scope="module")
def pristine(config, tmp_path_factory):
    """A complete float32 store, copied by each test that damages it."""
    root = tmp_path_factory.mktemp("pristine") / "store"
    capture(config, root, top_k=K, values="float32", shard_samples=PER, quiet=True)
    return root


@pytest.fixture
def root(pristine, tmp_path):
    shutil.copytree(pristine, tmp_path / "store")
    return tmp_path / "store"


def _command(config, root) -> str:
    return f"kdcore capture {config} --out {root} --top-k {K} --values float32 --shard-samples {PER}"


def _again(config, root) -> str:
    return f"run the same capture again to rewrite it: {_command(config, root)}"


def _recapture(config, root, monkeypatch) -> list[int]:
    """Run the same capture again; the shards it wrote."""
    written, real = [], store.write_shard
    monkeypatch.setattr(store, "write_shard", lambda r, j, rec: (written.append(j), real(r, j, rec)))
    capture(config, root, top_k=K, values="float32", shard_samples=PER, quiet=True)
    monkeypatch.setattr(store, "write_shard", real)
    return written


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def _cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _store_config(config, root, tmp_path) -> Path:
    conf = runs.student_config("unused", epochs=1)
    conf["data"] = dict(DATA)
    conf["teacher"] = {"source": "store", "store": str(root)}
    path = tmp_path / "from_store.toml"
    path.write_text(tomli_w.dumps(conf))
    return path


# -- shards: digests, presence, size ----------------------------------------------------------------
def test_a_flipped_byte_is_found_on_first_read_and_the_capture_rewrites_it(config, pristine, root, monkeypatch):
    shard = root / "shard-00002.bin"
    data = bytearray(shard.read_bytes())
    data[17 * 25 + 5] ^= 0x01  # the last bit of a float32 value of sample 217: no value check sees it
    shard.write_bytes(bytes(data))
    reader = store.StoreReader.open(root)  # sizes are right: opening is fine
    reader.read(torch.tensor([5, 150]))   # other shards read fine
    with pytest.raises(store.DamagedStore) as exc:
        reader.read(torch.tensor([217]))
    assert str(exc.value) == (f"{shard} (samples 200..299) is damaged (its SHA-256 differs from the one in "
                              f"manifest.json); {_again(config, root)}")
    assert _recapture(config, root, monkeypatch) == [2]
    assert _files(root) == _files(pristine)


def test_a_truncated_or_deleted_shard_is_refused_before_training_and_rewritten(config, pristine, root, tmp_path,
                                                                              monkeypatch, capsys):
    with open(root / "shard-00001.bin", "r+b") as f:
        f.truncate(1234)
    (root / "shard-00003.bin").unlink()
    message = (f"teacher.store: {root}/shard-00001.bin (samples 100..199) has 1234 bytes, not 2500 "
               f"(and 1 more shards); {_again(config, root)}")
    with pytest.raises(kdcore.ConfigError) as exc:
        store.StoreReader.open(root)
    assert str(exc.value) == message
    code, err = _cli(capsys, "train", _store_config(config, root, tmp_path), "--out", tmp_path / "run", "--quiet")
    assert (code, err) == (2, f"kdcore: error: {message}\n")
    assert _recapture(config, root, monkeypatch) == [1, 3]
    assert _files(root) == _files(pristine)


def test_a_shard_deleted_while_training_reads_the_store_is_named(config, root):
    reader = store.StoreReader.open(root)
    (root / "shard-00005.bin").unlink()
    with pytest.raises(store.DamagedStore) as exc:
        reader.read(torch.tensor([3, 512]))
    assert str(exc.value) == f"{root}/shard-00005.bin (samples 500..539) is missing; {_again(config, root)}"


# -- records: values that no capture writes, under a correct digest -----------------------------------
def _damage(root: Path, sample: int, change) -> None:
    """Rewrite the record of ``sample`` as ``change(ids, logp, rest)`` codes it (in place, numpy
    arrays [k]), then record the shard's new SHA-256 so that only the value checks can tell."""
    manifest = json.loads((root / store.MANIFEST).read_text())
    layout = Layout.from_json(manifest["layout"])
    ids, logp, rest = store.StoreReader(root, manifest).read(torch.tensor([sample]))
    ids, logp, rest = ids.numpy().copy(), logp.double().numpy().copy(), rest.double().numpy().copy()
    record = change(ids[0], logp[0], rest)
    if record is None:
        record = encode(layout, torch.from_numpy(ids), torch.from_numpy(logp), torch.from_numpy(rest))[0]
    shard = root / store.shard_name(sample // PER)
    data = bytearray(shard.read_bytes())
    at = (sample % PER) * layout.record_bytes
    data[at:at + layout.record_bytes] = bytes(record)
    shard.write_bytes(bytes(data))
    if store.DIGESTS in manifest:
        manifest[store.DIGESTS][shard.name] = store.file_sha256(shard)
        store.write_manifest(root, manifest)


def _set(array, i, value):
    array[i] = value


def _extra_id_bit(layout):
    """A change that sets one more bit of the unary high parts: the record then codes k + 1 ids."""
    def change(ids, logp, rest):
        record = encode(layout, torch.from_numpy(ids[None]), torch.from_numpy(logp[None]),
                              torch.from_numpy(rest))[0]
        bits = np.unpackbits(record, bitorder="little")
        upper = K * layout.low_bits
        free = upper + int(np.nonzero(bits[upper:upper + layout._upper_bits] == 0)[0][0])
        bits[free] = 1
        return np.packbits(bits, bitorder="little")
    return change


FAULTS = {
    "nan": (lambda ids, logp, rest: _set(logp, 2, float("nan")), "a log-probability is NaN"),
    "positive": (lambda ids, logp, rest: _set(logp, 1, 0.5), "a log-probability is 0.5 > 0"),
    "tail_nan": (lambda ids, logp, rest: _set(rest, 0, float("nan")), "the tail's log-mass is NaN"),
    "repeated_id": (lambda ids, logp, rest: _set(ids, 1, ids[0]), "its ids repeat or are out of order"),
    "id_out_of_range": (lambda ids, logp, rest: _set(ids, 3, 630), "an id is 630, outside 0..599"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_record_with_impossible_values_is_named_by_shard_and_sample(config, root, fault):
    change, reason = FAULTS[fault]
    _damage(root, 321, change)
    reader = store.StoreReader.open(root)
    reader.read(torch.arange(300, 321))
    with pytest.raises(store.DamagedStore) as exc:
        reader.read(torch.tensor([7, 321]))
    assert str(exc.value) == (f"{root}/shard-00003.bin (samples 300..399) holds a damaged record at sample 321 "
                              f"({reason}); {_again(config, root)}")


def test_a_record_coding_more_than_k_ids_or_mass_off_one_is_named(config, root):
    layout = Layout.from_json(json.loads((root / store.MANIFEST).read_text())["layout"])
    _damage(root, 44, _extra_id_bit(layout))
    _damage(root, 45, lambda ids, logp, rest: _set(logp, 0, logp[0] + 1.0))  # kept mass times e at one id
    reader = store.StoreReader.open(root)
    with pytest.raises(store.DamagedStore) as exc:
        reader.read(torch.tensor([44]))
    assert str(exc.value) == (f"{root}/shard-00000.bin (samples 0..99) holds a damaged record at sample 44 "
                              f"(it codes 5 ids, not k = 4); {_again(config, root)}")
    with pytest.raises(store.DamagedStore,
                       match=r"^\S+/shard-00000\.bin \(samples 0\.\.99\) holds a damaged record at sample 45 "
                             r"\(its kept and tail mass sum to 1\.0\d+, not 1\); run the same capture again"):
        reader.read(torch.tensor([45]))


def test_the_value_checks_accept_every_coding_of_real_teachers():
    """No false alarm: top-k of peaked and flat logits, every coding, k from 1 to every class."""
    g = torch.Generator().manual_seed(0)
    for classes, k in ((3, 3), (3, 1), (600, 4), (256, 128), (2000, 2000), (32000, 128)):
        for scale in (1e-6, 1e-4, 0.01, 3.0, 30.0, 300.0):
            ids, logp, rest = top_k(torch.randn(64, classes, generator=g) * scale, k)
            for values in VALUE_CODINGS:
                layout = choose_layout(classes, k, values)
                check_values(layout, *decode(layout, encode(layout, ids, logp, rest)))


def test_a_store_nan_stops_training_as_the_stores_damage_not_a_loss(config, root, tmp_path, capsys):
    _damage(root, 130, FAULTS["nan"][0])
    code, err = _cli(capsys, "train", _store_config(config, root, tmp_path), "--out", tmp_path / "run", "--quiet")
    assert (code, err) == (1, f"kdcore: failed: {root}/shard-00001.bin (samples 100..199) holds a damaged record "
                              f"at sample 130 (a log-probability is NaN); {_again(config, root)}\n")


def test_a_teacher_giving_nan_stops_the_capture_before_writing(config, tmp_path, monkeypatch, capsys):
    real = capture_module.forward

    def nan_at_sample_7(*args):
        out = real(*args)
        kdcore.Outputs.of(out).logits[7, 3] = float("nan")
        return out

    monkeypatch.setattr(capture_module, "forward", nan_at_sample_7)
    code, err = _cli(capsys, "capture", config, "--out", tmp_path / "s", "--top-k", K, "--quiet")
    assert (code, err) == (1, "kdcore: failed: capture: the teacher's outputs on training sample 7 are not "
                              "log-probabilities (a log-probability is NaN); nothing of them was written; check "
                              "the teacher's checkpoint, or capture with run.amp = \"off\"\n")
    assert not list((tmp_path / "s").glob("shard-*"))


# -- the manifest --------------------------------------------------------------------------------------
def test_a_manifest_without_shards_is_one_line_naming_the_store(config, root, tmp_path, capsys):
    manifest = json.loads((root / store.MANIFEST).read_text())
    del manifest["shards"]
    (root / store.MANIFEST).write_text(json.dumps(manifest))
    damaged = f"{root}/manifest.json is damaged (it lacks 'shards'); delete {root} and capture it again: "
    with pytest.raises(kdcore.ConfigError) as exc:
        store.StoreReader.open(root)
    assert str(exc.value) == f"teacher.store: {damaged}{_command(config, root)}"
    code, err = _cli(capsys, "train", _store_config(config, root, tmp_path), "--out", tmp_path / "run", "--quiet")
    assert (code, err) == (2, f"kdcore: error: teacher.store: {damaged}{_command(config, root)}\n")
    code, err = _cli(capsys, "capture", config, "--out", root, "--top-k", K, "--values", "float32",
                     "--shard-samples", PER, "--quiet")
    assert (code, err) == (2, f"kdcore: error: --out: {damaged}{_command(config, root)}\n")


def test_a_truncated_manifest_says_to_capture_again(root):
    text = (root / store.MANIFEST).read_text()
    (root / store.MANIFEST).write_text(text[:len(text) // 2])
    with pytest.raises(kdcore.ConfigError) as exc:
        store.StoreReader.open(root)
    assert str(exc.value).startswith(f"teacher.store: {root}/manifest.json is not a readable store manifest (")
    assert str(exc.value).endswith(f"); delete {root} and capture it again: kdcore capture CONFIG.toml --out {root} "
                                   "(with the arguments it was made with)")
    assert "\n" not in str(exc.value)


def test_a_fifo_in_place_of_the_manifest_or_a_shard_is_refused_without_blocking(config, root):
    (root / "shard-00004.bin").unlink()
    os.mkfifo(root / "shard-00004.bin")
    with pytest.raises(kdcore.ConfigError) as exc:
        store.StoreReader.open(root)
    assert str(exc.value) == (f"teacher.store: {root}/shard-00004.bin (samples 400..499) has 0 bytes, not 2500; "
                              f"{_again(config, root)}")
    (root / store.MANIFEST).unlink()
    os.mkfifo(root / store.MANIFEST)
    with pytest.raises(kdcore.ConfigError) as exc:
        store.StoreReader.open(root)
    assert str(exc.value) == (f"teacher.store: {root}/manifest.json is not a regular file; delete {root} and capture "
                              f"it again: kdcore capture CONFIG.toml --out {root} (with the arguments it was made with)")


def test_a_store_without_digests_is_read_and_the_capture_records_them(config, pristine, root, monkeypatch):
    """A store of kdcore 0.1 (no digests, no capture arguments): read with the value checks only."""
    manifest = json.loads((root / store.MANIFEST).read_text())
    del manifest[store.DIGESTS], manifest[store.CAPTURE_ARGS]
    store.write_manifest(root, manifest)
    reader = store.StoreReader.open(root)
    assert reader.read(torch.arange(540))[0].shape == (540, K)
    _damage(root, 9, FAULTS["positive"][0])
    with pytest.raises(store.DamagedStore) as exc:
        store.StoreReader.open(root).read(torch.tensor([9]))
    assert str(exc.value) == (f"{root}/shard-00000.bin (samples 0..99) holds a damaged record at sample 9 "
                              f"(a log-probability is 0.5 > 0); run the same capture again to rewrite it: "
                              f"kdcore capture CONFIG.toml --out {root} (with the arguments it was made with)")
    assert _recapture(config, root, monkeypatch) == [0]  # the others pass the value checks: kept
    assert _files(root) == _files(pristine)


# -- an interrupted capture --------------------------------------------------------------------------
def _capture_args(config, out):
    return ["capture", config, "--out", out, "--top-k", K, "--values", "float32", "--shard-samples", PER, "--quiet"]


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "enospc"])
def test_an_interrupted_capture_says_to_run_the_same_command_again(config, pristine, tmp_path, monkeypatch, capsys,
                                                                   how):
    real = store.write_shard
    out = tmp_path / "s"

    def stops_at_the_third(root, j, records):
        if j == 2:
            if how == "ctrl-c":
                raise KeyboardInterrupt
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(root, j, records)

    monkeypatch.setattr(store, "write_shard", stops_at_the_third)
    code, err = _cli(capsys, *_capture_args(config, out))
    again = "run the same kdcore capture command again to continue"
    assert (code, err) == {
        "ctrl-c": (130, f"kdcore: interrupted ({again})\n"),
        "sigterm": (143, f"kdcore: terminated by SIGTERM ({again})\n"),
        "enospc": (1, f"kdcore: failed: capture stopped at {out}/shard-00002.bin (samples 200..299): OSError: "
                      f"[Errno 28] No space left on device; the 2 finished shard(s) are kept: {again}\n"),
    }[how]
    monkeypatch.setattr(store, "write_shard", real)
    assert _cli(capsys, *_capture_args(config, out))[0] == 0
    assert _files(out) == _files(pristine)


# -- the teacher cache's spill file --------------------------------------------------------------------
def _full_disk(fd, offset, length):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _cache_message(directory, mib) -> str:
    return (f"no space left on the device for the teacher cache file in {directory} ({mib} MiB); free space "
            f"there, set teacher.cache_budget_mb >= {mib} to keep the cache in the run device's memory instead, "
            "or set teacher.cache = false")


def test_the_cache_file_on_a_full_disk_is_a_one_line_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", _full_disk)
    value = torch.zeros(4, 600)
    with pytest.raises(RunFailure) as exc:
        teacher_cache._Rows(1000, value, 0, torch.device("cpu"), tmp_path)
    assert str(exc.value) == _cache_message(tmp_path, 3)  # 1000 rows of 2400 bytes
    assert list(tmp_path.iterdir()) == []


def _unsupported(fd, offset, length):
    raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))


def test_the_cache_file_is_written_with_zeros_where_space_cannot_be_reserved(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", _unsupported)
    rows = teacher_cache._Rows(3000, torch.zeros(1, 600), 0, torch.device("cpu"), tmp_path)
    assert os.fstat(rows._file.fileno()).st_blocks * 512 >= 3000 * 2400  # allocated, not a sparse file
    rows.put(torch.tensor([2999]), torch.ones(1, 600))
    assert torch.equal(rows.get(torch.tensor([2999, 0])), torch.stack([torch.ones(600), torch.zeros(600)]))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where mounting is not permitted), unmounted afterwards."""
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


@pytest.mark.parametrize("reserve", ["fallocate", "zeros"])
def test_the_cache_file_on_a_full_tmpfs(small_tmpfs, monkeypatch, reserve):
    if reserve == "zeros":
        monkeypatch.setattr(os, "posix_fallocate", _unsupported)
    with pytest.raises(RunFailure) as exc:
        teacher_cache._Rows(1000, torch.zeros(1, 600), 0, torch.device("cpu"), small_tmpfs)
    assert str(exc.value) == _cache_message(small_tmpfs, 3)


def test_a_run_whose_cache_finds_the_disk_full_keeps_its_last_checkpoint(config, tmp_path, monkeypatch, capsys):
    cached = copy.deepcopy(tomllib.loads(config.read_text()))
    cached["teacher"].update(cache=True, cache_budget_mb=1)  # 540 x 600 float32 logits: 1.3 MB, in a file
    path = tmp_path / "cached.toml"
    path.write_text(tomli_w.dumps(cached))
    out = tmp_path / "run"
    assert _cli(capsys, "train", path, "--out", out, "--quiet")[0] == 0
    last = (out / "checkpoints" / "last.pt").read_bytes()
    monkeypatch.setattr(os, "posix_fallocate", _full_disk)
    code, err = _cli(capsys, "train", path, "--out", out, "--quiet", "--resume", "--set", "run.epochs=2")
    assert (code, err) == (1, f"kdcore: failed: {_cache_message(out, 2)}\n")
    assert (out / "checkpoints" / "last.pt").read_bytes() == last
