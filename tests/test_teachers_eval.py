"""The teacher's evaluation for the summary is kept (``$KDCORE_CACHE_DIR/teacher-eval``) and
reused by later runs of the same teacher on the same data; a changed checkpoint is evaluated
again, a damaged entry is recomputed with a one-line warning, a read-only cache only warns,
and ``run.evaluate_teacher = false`` turns the evaluation off."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import pytest
import torch

import kdcore
from kdcore.engine import teacher_eval

_spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).with_name("helpers_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("teacher")
    kdcore.train(runs.teacher_config(epochs=1), root, quiet=True)
    return root / "checkpoints" / "last.pt"


@pytest.fixture
def counted(monkeypatch, tmp_path) -> list[str]:
    """A fresh cache directory; the list of the teacher evaluations actually computed."""
    monkeypatch.setenv("KDCORE_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[str] = []
    real = teacher_eval.evaluate_top1

    def counting(model, split, prefix, *args, **kwargs):
        calls.append(prefix)
        return real(model, split, prefix, *args, **kwargs)

    monkeypatch.setattr(teacher_eval, "evaluate_top1", counting)
    return calls


def _train(checkpoint: Path, out: Path, *overrides: str) -> dict:
    conf = runs.student_config(str(checkpoint), epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = kdcore.train(conf, out, overrides, quiet=True)
    summary["warnings"] = [str(w.message) for w in caught if "teacher-eval" in str(w.message)]
    return summary


TEACHER_KEYS = ("teacher_test_acc", "teacher_test_nll", "teacher_test_tv", "teacher_test_l2", "teacher_test_kl",
                "test_agreement")


def _entries(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "teacher-eval").iterdir())


def test_a_second_run_of_the_same_teacher_reuses_its_evaluation(checkpoint, counted, tmp_path):
    first = _train(checkpoint, tmp_path / "r1")
    second = _train(checkpoint, tmp_path / "r2", "run.seed=4")  # another student: the same teacher
    assert counted == ["test"] and first["warnings"] == second["warnings"] == []
    for k in TEACHER_KEYS[:-1]:
        assert second[k] == first[k], k
    assert [p.suffix for p in _entries(tmp_path)] == [".json", ".pt"]
    evaluated = _train(checkpoint, tmp_path / "r3", "run.seed=4", "run.eval_batch_size=7")  # other eval settings
    assert counted == ["test", "test"] and second["test_agreement"] == pytest.approx(evaluated["test_agreement"])


def test_a_changed_checkpoint_is_evaluated_again(checkpoint, counted, tmp_path):
    copy = tmp_path / "teacher.pt"
    state = torch.load(checkpoint, weights_only=True)
    torch.save(state, copy)
    _train(copy, tmp_path / "r1")
    state["model"]["net.3.weight"] *= 2.0
    torch.save(state, copy)
    changed = _train(copy, tmp_path / "r2")
    assert counted == ["test", "test"] and len(_entries(tmp_path)) == 4
    assert changed["teacher_test_nll"] != _train(checkpoint, tmp_path / "r3")["teacher_test_nll"]


@pytest.mark.parametrize("suffix, damage, why", [
    (".json", lambda b: b[:-20], "JSONDecodeError"),
    (".json", lambda b: b.replace(b'"test_acc"', b'"test_acx"', 1).replace(b"format", b"formax", 1),
     "not an entry for this teacher and data"),
    (".pt", lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "its SHA-256 differs from the one in its .json"),
])
def test_a_damaged_entry_is_recomputed_with_a_warning(checkpoint, counted, tmp_path, suffix, damage, why):
    first = _train(checkpoint, tmp_path / "r1")
    entry = next(p for p in _entries(tmp_path) if p.suffix == suffix)
    entry.write_bytes(damage(entry.read_bytes()))
    again = _train(checkpoint, tmp_path / "r2")
    if why == "JSONDecodeError":
        assert len(again["warnings"]) == 1 and again["warnings"][0].startswith(
            f"teacher-eval cache entry {entry} is damaged (JSONDecodeError: ")
    else:
        assert again["warnings"] == [f"teacher-eval cache entry {entry} is damaged ({why}); evaluating teacher "
                                     "'teacher' again"]
    assert counted == ["test", "test"] and all(again[k] == first[k] for k in TEACHER_KEYS)
    third = _train(checkpoint, tmp_path / "r3")  # the entry was written again, whole
    assert counted == ["test", "test"] and third["warnings"] == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_cache_only_warns(checkpoint, counted, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache").chmod(0o500)
    try:
        summary = _train(checkpoint, tmp_path / "r1")
    finally:
        (tmp_path / "cache").chmod(0o700)
    assert len(summary["warnings"]) == 1 and summary["warnings"][0].startswith(
        f"cannot write the teacher-eval cache in {tmp_path / 'cache' / 'teacher-eval'} (")
    assert "teacher_test_acc" in summary


def test_a_cache_that_cannot_be_written_only_warns(checkpoint, counted, tmp_path, monkeypatch):
    """The cache directory is a file (as a read-only or full disk would refuse it too)."""
    (tmp_path / "cache").write_text("not a folder")
    summary = _train(checkpoint, tmp_path / "r1")
    assert summary["warnings"] == [f"cannot write the teacher-eval cache in {tmp_path / 'cache' / 'teacher-eval'} "
                                   f"([Errno 20] Not a directory: '{tmp_path / 'cache' / 'teacher-eval'}'); the "
                                   "teacher is evaluated again next run (set KDCORE_CACHE_DIR to a writable "
                                   "directory)"]
    assert counted == ["test"] and "teacher_test_acc" in summary


def test_a_full_disk_only_warns(checkpoint, counted, tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(teacher_eval, "atomic_torch_save", full)
    summary = _train(checkpoint, tmp_path / "r1")
    assert summary["warnings"] == [f"cannot write the teacher-eval cache in {tmp_path / 'cache' / 'teacher-eval'} "
                                   "([Errno 28] No space left on device); the teacher is evaluated again next run "
                                   "(set KDCORE_CACHE_DIR to a writable directory)"]
    assert "teacher_test_acc" in summary


def test_evaluate_teacher_false_turns_the_evaluation_off(checkpoint, counted, tmp_path, capsys):
    summary = _train(checkpoint, tmp_path / "r1", "run.evaluate_teacher=false")
    assert counted == [] and not any(k in summary for k in TEACHER_KEYS)
    assert not (tmp_path / "cache").exists()
