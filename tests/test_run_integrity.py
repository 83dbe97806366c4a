"""Issue "trust": a run checks what it reads and survives what breaks while it writes.

Every test injects the fault (a flipped bit, a full or read-only file system, a
killed process, a directory or pipe in the way, a loss term changed between a run
and its resume) and checks the one line and the exit status the user gets.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import kdcore
from kdcore.common.errors import RunFailure
from kdcore.common.files import atomic_torch_save, atomic_write
from kdcore.engine.checkpoint_file import DamagedFile, verify_members
from kdcore.engine.checkpoints import load_checkpoint
from kdcore.engine.logs import JsonLines
from kdcore.engine.rundir import LOCK_FILE, RunDir, RunLock

_spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).with_name("helpers_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)

START_AGAIN = "resume from an earlier copy of last.pt, or start again with --overwrite"
CANNOT_WRITE = "a run needs a directory it may write (copy the run to one)"


write, cli, one_line, snapshot = runs.write, runs.cli, runs.one_line, runs.snapshot


def resume(capsys, run: Path, *sets: str) -> tuple[int, str]:
    """``kdcore train c.toml --out RUN --resume`` with one more epoch than ``finished`` did."""
    return cli(capsys, "train", str(run.parent / "c.toml"), "--out", str(run), "--resume", "--quiet",
               "--set", "run.epochs=3", *(a for s in sets for a in ("--set", s)))


@contextlib.contextmanager
def small_fs(where: Path, size: str):
    """A tmpfs of ``size`` mounted at ``where`` (the test is skipped where mounting is not permitted)."""
    where.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(directory: Path) -> None:
    """Fill the file system of ``directory`` to the last byte."""
    with (directory / "filler").open("wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-epoch teacher run (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    kdcore.train(_config(), out, quiet=True)
    return out


def _config(**student) -> dict:
    conf = runs.teacher_config(epochs=2)
    conf["run"]["log_every"] = 5
    conf["student"].update(student)
    return conf


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    write(tmp_path / "c.toml", _config())
    return tmp_path / "run"


def flip_low_bit(path: Path) -> str:
    """Flip the lowest bit of the first byte of the largest tensor in the checkpoint ``path``
    (the lowest mantissa bit of a float32: a change no load notices); returns its member's name."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with path.open("r+b") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
        f.seek(start)
        byte = f.read(1)[0]
        f.seek(start)
        f.write(bytes([byte ^ 1]))
    return info.filename


# -- 1. checkpoints are verified before use ----------------------------------------------------------
def test_a_flipped_bit_in_a_weight_of_last_pt_exits_1_naming_the_member(capsys, run_copy):
    last = run_copy / "checkpoints" / "last.pt"
    member = flip_low_bit(last)
    assert torch.load(last, weights_only=True)["epoch"] == 2  # the damage torch.load does not see
    before = snapshot(run_copy)
    code, err = resume(capsys, run_copy)
    assert code == 1
    assert one_line(err) == (f"kdcore: failed: {last}: damaged checkpoint: member {member!r} fails its CRC-32 "
                             f"check: the file is damaged; {START_AGAIN}")
    assert snapshot(run_copy) == before


def test_a_flipped_bit_in_a_teacher_checkpoint_exits_2_naming_the_member(capsys, finished, tmp_path):
    best = tmp_path / "best.pt"
    shutil.copy(finished / "checkpoints" / "best.pt", best)
    member = flip_low_bit(best)
    conf = write(tmp_path / "s.toml", runs.student_config(str(best), epochs=1))
    code, err = cli(capsys, "train", str(conf), "--out", str(tmp_path / "s"), "--quiet")
    assert code == 2
    assert one_line(err) == (f"kdcore: error: teacher.checkpoint: cannot load {best}: member {member!r} fails "
                             "its CRC-32 check: the file is damaged; copy it again or name an intact checkpoint")
    assert not (tmp_path / "s").exists()


def test_a_compressed_member_with_a_flipped_bit_is_found(tmp_path):
    path = tmp_path / "z.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("z/data/0", bytes(range(256)) * 64)
    verify_members(path)
    data = bytearray(path.read_bytes())
    data[60] ^= 1  # inside the deflated data, after the 38-byte local header
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedFile, match=r"^member 'z/data/0' fails its CRC-32 check: the file is damaged$"):
        verify_members(path)


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("-inf"), "infinite")])
def test_non_finite_weights_in_last_pt_exit_1_naming_the_tensor(capsys, run_copy, value, kind):
    last = run_copy / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["model"]["net.3.bias"][1] = value
    torch.save(state, last)
    code, err = resume(capsys, run_copy)
    assert code == 1
    assert one_line(err) == (f"kdcore: failed: {last}: holds non-finite weights ({kind} entries in the student's "
                             f"'net.3.bias'); {START_AGAIN}")


def test_a_named_pipe_as_teacher_checkpoint_exits_2_without_reading_it(capsys, tmp_path):
    pipe = tmp_path / "teacher.pt"
    os.mkfifo(pipe)
    fd = os.open(pipe, os.O_RDWR)  # a writer, so that a reader that opened it would get bytes, not hang
    try:
        os.write(fd, b"junk")
        conf = write(tmp_path / "s.toml", runs.student_config(str(pipe), epochs=1))
        code, err = cli(capsys, "train", str(conf), "--out", str(tmp_path / "s"), "--quiet")
    finally:
        os.close(fd)
    assert code == 2
    assert one_line(err) == (f"kdcore: error: teacher.checkpoint: cannot load {pipe}: it is not a regular file "
                             "(reading a pipe or a device would wait for ever)")


# -- 2. a full disk while writing is one line, and the previous file stays ---------------------------
def test_full_disk_while_saving_last_pt_exits_1_keeping_the_previous_one(capsys, tmp_path):
    conf = _config(hidden=[2048])  # last.pt ~850 kB: one fits in the tmpfs, a second beside it does not
    conf["run"].update(epochs=1, checkpoint_every=2)
    write(tmp_path / "c.toml", conf)
    with small_fs(tmp_path / "fs", "1200k") as fs:
        out = fs / "run"
        code, err = cli(capsys, "train", str(tmp_path / "c.toml"), "--out", str(out), "--quiet")
        last = out / "checkpoints" / "last.pt"
        assert code == 1
        assert one_line(err) == (f"kdcore: failed: no space left on the device writing {last} "
                                 "(the previous last.pt is intact)")
        assert load_checkpoint(last)["step"] == 2
        assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]
        assert not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("save", [lambda p: atomic_write(p, b"new"), lambda p: atomic_torch_save({"x": 1}, p)])
def test_full_disk_at_fsync_keeps_the_previous_file(tmp_path, monkeypatch, save):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(RunFailure) as failure:
        save(path)
    assert str(failure.value) == f"no space left on the device writing {path} (the previous summary.json is intact)"
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_full_disk_at_the_start_of_a_run_exits_1_and_leaves_no_lock(capsys, tmp_path):
    conf = write(tmp_path / "c.toml", _config())
    with small_fs(tmp_path / "fs", "64k") as fs:
        (fs / "run").mkdir()
        fill(fs)
        code, err = cli(capsys, "train", str(conf), "--out", str(fs / "run"), "--quiet")
        assert code == 1
        assert one_line(err) == (f"kdcore: failed: no space left on the device writing {fs / 'run' / LOCK_FILE} "
                                 "(nothing was written)")
        assert not any((fs / "run").iterdir())


def test_full_disk_appending_to_metrics_is_one_line(tmp_path):
    with small_fs(tmp_path / "fs", "64k") as fs:
        log = JsonLines(fs / "metrics.jsonl")
        log.append({"step": 1})
        fill(fs)
        with pytest.raises(RunFailure) as failure:
            log.append({"step": 2, "note": "x" * 8192})  # more than the write buffer: the write reaches the disk
        assert str(failure.value) == (f"no space left on the device writing {log.path} "
                                      "(its earlier lines are intact)")


# -- 3. damaged lines of the logs are kept, not deleted -----------------------------------------------
def test_damaged_lines_are_moved_aside_with_one_warning(tmp_path):
    log = JsonLines(tmp_path / "metrics.jsonl")
    damaged = [b'{"step": 2, "loss/ce": 0.5\xff}', b'{"step": 4, "lo']  # a bad byte; a half-written line
    log.path.write_bytes(b'{"step": 1}\n' + damaged[0] + b'\n{"step": 3}\n' + damaged[1])
    with pytest.warns(UserWarning) as caught:
        log.truncate_after(3)
    assert [str(w.message) for w in caught] == [
        f"{log.path}:2: damaged line moved to {tmp_path / 'metrics.damaged.jsonl'} (and 1 more)"]
    assert log.path.read_bytes() == b'{"step": 1}\n{"step": 3}\n'
    assert log.damaged_path.read_bytes() == b"".join(line + b"\n" for line in damaged)
    with log.path.open("ab") as f:
        f.write(b"[5]\n")  # JSON, but not a record
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:3: damaged line moved to .*metrics\.damaged\.jsonl$"):
        log.truncate_after(3)
    assert log.damaged_path.read_bytes() == b"".join(line + b"\n" for line in [*damaged, b"[5]"])


def test_resume_keeps_a_damaged_middle_line_of_metrics(capsys, run_copy):
    metrics = run_copy / "metrics.jsonl"
    first, second = metrics.read_bytes().splitlines()
    damaged = first.replace(b'"epoch": 1', b'"epoch": \x01')
    metrics.write_bytes(damaged + b"\n" + second + b"\n")
    with pytest.warns(UserWarning) as caught:
        code, err = resume(capsys, run_copy)
    assert code == 0, err
    assert [str(w.message) for w in caught] == [
        f"{metrics}:1: damaged line moved to {run_copy / 'metrics.damaged.jsonl'}"]
    assert (run_copy / "metrics.damaged.jsonl").read_bytes() == damaged + b"\n"
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [2, 3]


# -- 4. temporary files of a killed write are removed when the run is next opened ---------------------
KILLED_WHILE_SAVING = """
import os, signal, sys
from pathlib import Path
from kdcore.common.files import atomic_torch_save, atomic_write
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed between the write and the rename
run = Path(sys.argv[1])
child = os.fork()
if child == 0:
    atomic_write(run / "metrics.jsonl", "{}")
os.waitpid(child, 0)
atomic_torch_save({"x": 1}, run / "checkpoints" / "last.pt")
"""


def test_temporaries_of_killed_saves_are_removed_once_the_lock_is_held(capsys, run_copy):
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, str(run_copy)], timeout=120)
    assert killed.returncode == -signal.SIGKILL
    left = sorted(run_copy.rglob(".*.tmp"))
    assert sorted(p.name.split(".")[1] for p in left) == ["last", "metrics"], left
    mine = [run_copy / ".notes.tmp", run_copy / "checkpoints" / "x.12345678.tmp"]  # not kdcore's names
    for path in mine:
        path.write_text("mine")
    lock = RunLock.acquire(run_copy)  # another run holds the directory
    try:
        code, err = resume(capsys, run_copy)
        assert code == 2 and "in use by another run" in one_line(err)
        assert sorted(run_copy.rglob(".*.tmp")) == sorted([*left, mine[0]])  # not ours to touch then
    finally:
        lock.release()
    code, err = resume(capsys, run_copy)
    assert code == 0, err
    assert sorted(run_copy.rglob("*.tmp")) == sorted(mine)


# -- 5. a directory or a pipe where the run writes a file is found at the start -----------------------
@pytest.mark.parametrize("name, make, kind", [
    ("metrics.jsonl", Path.mkdir, "a directory"),
    (LOCK_FILE, Path.mkdir, "a directory"),
    ("summary.json", Path.mkdir, "a directory"),
    ("checkpoints/best.pt", os.mkfifo, "a named pipe")])
def test_a_directory_or_pipe_in_place_of_a_run_file_exits_2_before_training(capsys, run_copy, name, make, kind):
    path = run_copy / name
    if path.exists():
        path.unlink()
    make(path)
    before = snapshot(run_copy)
    code, err = resume(capsys, run_copy)
    assert code == 2
    assert one_line(err) == (f"kdcore: error: --out: {path} is {kind}, where the run writes a file; "
                             "remove or rename it")
    assert snapshot(run_copy) == before


def test_a_pipe_in_place_of_steps_jsonl_stops_a_new_run(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / "steps.jsonl")
    code, err = cli(capsys, "train", str(write(tmp_path / "c.toml", _config())), "--out", str(out), "--quiet")
    assert code == 2
    assert one_line(err) == (f"kdcore: error: --out: {out / 'steps.jsonl'} is a named pipe, where the run writes "
                             "a file; remove or rename it")
    assert sorted(p.name for p in out.iterdir()) == ["steps.jsonl"]


# -- 6. a resume that cannot continue is refused before training -------------------------------------
SCALED = """
import torch
import torch.nn.functional as F
from torch import nn


class Scaled(nn.Module):
    \"\"\"Cross-entropy times the mean of a learnt vector of ``size`` entries.\"\"\"

    uses_teacher = False

    def __init__(self, size: int = 3):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(size))

    def forward(self, student, teacher, target):
        return F.cross_entropy(student, target) * self.scale.mean()
"""


def _with_scaled(tmp_path: Path, size: int | None) -> dict:
    (tmp_path / "toyterm.py").write_text(textwrap.dedent(SCALED))
    conf = _config()
    if size is not None:
        conf["loss"].append({"name": "python:toyterm:Scaled", "id": "scaled", "size": size})
    return conf


@pytest.fixture(scope="module")
def finished_scaled(tmp_path_factory) -> Path:
    """A finished two-epoch run with the trainable loss term ``scaled`` (3 entries)."""
    root = tmp_path_factory.mktemp("scaled")
    kdcore.train(write(root / "c.toml", _with_scaled(root, 3)), root / "run", quiet=True)
    return root / "run"


@pytest.mark.parametrize("before, after, message", [
    (None, 3, "loss[1]: loss term 'scaled' has parameters or buffers that {last} does not hold (a term added "
              "since); a resume keeps the loss terms: remove it, or start again with --overwrite"),
    (3, 4, "loss[1]: {last} does not fit loss term 'scaled': 'scale' is [3] in the file, [4] in the term"),
    (3, None, "loss: {last} holds the state of loss term(s) 'scaled', which the config no longer has; a resume "
              "keeps the loss terms: add them back, or start again with --overwrite")])
def test_a_trainable_loss_term_added_changed_or_removed_exits_2_naming_it(capsys, finished, finished_scaled,
                                                                         tmp_path, before, after, message):
    run = tmp_path / "run"
    shutil.copytree(finished if before is None else finished_scaled, run)
    write(tmp_path / "c.toml", _with_scaled(tmp_path, after))
    last = run / "checkpoints" / "last.pt"
    snap = snapshot(run)
    code, err = resume(capsys, run)
    assert code == 2
    assert one_line(err) == "kdcore: error: " + message.format(last=last)
    assert snapshot(run) == snap


def test_resume_on_a_read_only_file_system_exits_2(capsys, run_copy, tmp_path):
    with small_fs(tmp_path / "fs", "4m") as fs:
        shutil.copytree(run_copy, fs / "run")
        shutil.copy(run_copy.parent / "c.toml", fs / "c.toml")
        remount = subprocess.run(["mount", "-o", "remount,ro", str(fs)], capture_output=True, text=True)
        if remount.returncode:
            pytest.skip(f"cannot remount the tmpfs read-only ({remount.stderr.strip()})")
        code, err = resume(capsys, fs / "run")
        assert code == 2
        assert one_line(err) == (f"kdcore: error: --out: cannot write {fs / 'run' / LOCK_FILE} (Read-only file "
                                 f"system); {CANNOT_WRITE}")


def test_a_lock_file_that_cannot_be_created_exits_2(capsys, run_copy, monkeypatch):
    lock, real_open = run_copy / LOCK_FILE, os.open

    def read_only(path, *args, **kwargs):
        if os.fspath(path) == str(lock):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    code, err = resume(capsys, run_copy)
    assert code == 2
    assert one_line(err) == f"kdcore: error: --out: cannot write {lock} (Read-only file system); {CANNOT_WRITE}"


def test_a_checkpoints_directory_without_write_permission_exits_2(run_copy, monkeypatch):
    checkpoints, real_access = run_copy / "checkpoints", os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != checkpoints and real_access(path, mode))
    with pytest.raises(kdcore.ConfigError) as refused:
        RunDir.open(run_copy, resume=True)
    assert str(refused.value) == f"--out: cannot write in {checkpoints} (no permission to write it); {CANNOT_WRITE}"
    assert not (run_copy / LOCK_FILE).exists()
