"""Issue 15: no run loses results, and every failure says what and where.

One test (or more) per numbered defect; ``test_<n>_...`` names the defect.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import tomli_w
import torch

from kdcore import config as cfg
import kdcore
from kdcore.common.env import env_flag
from kdcore.common.errors import ConfigError, DamagedCheckpoint, NonFiniteLoss
from kdcore.common.files import atomic_torch_save, atomic_write
from kdcore.engine.checkpoints import check_resume, load_checkpoint
from kdcore.engine.logs import JsonLines
from kdcore.engine.rundir import LOCK_FILE, RunDir, RunLock
from kdcore.plugins import PluginWarning, load_registry

_spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).with_name("helpers_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)


write, cli, one_line, snapshot = runs.write, runs.cli, runs.one_line, runs.snapshot


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished one-epoch teacher run (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    conf = runs.teacher_config(epochs=1)
    conf["run"]["log_every"] = 5
    kdcore.train(conf, out, quiet=True)
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    conf = runs.teacher_config(epochs=1)
    conf["run"]["log_every"] = 5
    write(tmp_path / "c.toml", conf)
    return tmp_path / "run"


# -- 1. a new run never silently replaces a finished one -------------------------------------------
def test_1_new_run_into_a_finished_run_is_refused_and_keeps_it(capsys, run_copy):
    before = snapshot(run_copy)
    code, err = cli(capsys, "train", str(run_copy.parent / "c.toml"), "--out", str(run_copy), "--quiet")
    assert code == 2
    line = one_line(err)
    assert "--resume" in line and "--overwrite" in line and str(run_copy) in line
    assert snapshot(run_copy) == before


def test_1_overwrite_replaces_the_old_run_entirely(capsys, run_copy):
    (run_copy / "notes.txt").write_text("mine")
    old_events = sorted((run_copy / "tb").iterdir())
    code, err = cli(capsys, "train", str(run_copy.parent / "c.toml"), "--out", str(run_copy), "--quiet",
                    "--overwrite")
    assert code == 0, err
    assert (run_copy / "notes.txt").read_text() == "mine"  # only the run's own files go
    events = sorted((run_copy / "tb").iterdir())
    assert len(events) == 1 and events != old_events
    assert not (run_copy / LOCK_FILE).exists()


def test_1_overwrite_and_resume_exclude_each_other(capsys, run_copy):
    code, err = cli(capsys, "train", str(run_copy.parent / "c.toml"), "--out", str(run_copy),
                    "--resume", "--overwrite")
    assert code == 2 and "--overwrite" in one_line(err)


def test_1_demo_into_an_earlier_demo_is_refused(capsys, run_copy):
    demo = run_copy.parent
    code, err = cli(capsys, "demo", "--out", str(demo), "--quiet")
    assert code == 2 and "--overwrite" in one_line(err)


# -- 2. a diverging run stops with exit 1, keeping its last finite checkpoint ----------------------
def test_2_non_finite_loss_exits_1_with_one_line(capsys, monkeypatch, tmp_path):
    import kdcore.cli

    def diverged(args):
        raise NonFiniteLoss(12, "ce", float("nan"))

    monkeypatch.setattr(kdcore.cli.commands, "_cmd_list", diverged)
    code, err = cli(capsys, "list")
    assert code == 1 and "step 12: loss term 'ce' is nan" in one_line(err)


def test_2_diverging_run_stops_and_keeps_finite_checkpoints(capsys, tmp_path):
    conf = runs.teacher_config(epochs=3)
    conf["optim"] = {"name": "sgd", "lr": 1e6}
    code, err = cli(capsys, "train", str(write(tmp_path / "c.toml", conf)), "--out", str(tmp_path / "o"),
                    "--quiet")
    assert code == 1
    line = one_line(err)
    assert "step " in line and "'ce'" in line
    for name in ("last.pt", "best.pt"):
        path = tmp_path / "o" / "checkpoints" / name
        if path.exists():
            state = torch.load(path, weights_only=True)["model"]
            assert all(torch.isfinite(v).all() for v in state.values())


def test_2_teacher_with_non_finite_weights_is_refused(capsys, finished, tmp_path):
    state = torch.load(finished / "checkpoints" / "best.pt", weights_only=True)
    key = next(iter(state["model"]))
    state["model"][key][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    conf = runs.student_config(str(tmp_path / "nan.pt"), epochs=1)
    code, err = cli(capsys, "train", str(write(tmp_path / "s.toml", conf)), "--out", str(tmp_path / "s"))
    assert code == 2
    line = one_line(err)
    assert line.startswith("kdcore: error: teacher.checkpoint:") and "non-finite" in line and key in line
    assert not (tmp_path / "s").exists()


# -- 3. a run holds a lock on its directory ---------------------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from kdcore.engine.rundir import RunLock
lock = RunLock.acquire(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


def test_3_second_run_into_a_locked_directory_exits_2_naming_the_holder(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        conf = write(tmp_path / "c.toml", runs.teacher_config(epochs=1))
        code, err = cli(capsys, "train", str(conf), "--out", str(out), "--quiet")
        assert code == 2
        line = one_line(err)
        assert f"process {holder.pid} on {socket.gethostname()}" in line
        assert not (out / "config.toml").exists()
    finally:
        holder.kill()
        holder.wait()


def test_3_stale_lock_of_a_dead_process_is_taken_over_and_released(capsys, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "o"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    conf = write(tmp_path / "c.toml", runs.teacher_config(epochs=1))
    code, err = cli(capsys, "train", str(conf), "--out", str(out), "--quiet")
    assert code == 0, err
    assert not (out / LOCK_FILE).exists()


def test_3_lock_names_its_holder_and_is_exclusive(tmp_path):
    lock = RunLock.acquire(tmp_path)
    try:
        assert json.loads((tmp_path / LOCK_FILE).read_text()) == {"pid": os.getpid(),
                                                                  "host": socket.gethostname()}
        with pytest.raises(ConfigError, match=rf"in use by another run \(process {os.getpid()} "):
            RunLock.acquire(tmp_path)
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    RunLock.acquire(tmp_path).release()


def test_3_lock_file_naming_a_live_process_is_respected(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        with pytest.raises(ConfigError, match=f"process {holder.pid}"):
            RunDir.open(tmp_path)
    finally:
        holder.kill()
        holder.wait()


# -- 4. a half-written line does not block --resume -------------------------------------------------
def test_4_truncate_after_skips_a_partial_last_line(tmp_path):
    log = JsonLines(tmp_path / "m.jsonl")
    log.append({"step": 1})
    log.append({"step": 2})
    with log.path.open("ab") as f:
        f.write(b'{"step": 3, "loss/ce": 0.\xe2')  # killed mid-append, mid-character
    with pytest.warns(UserWarning, match=r"m\.jsonl:3: damaged line moved to .*m\.damaged\.jsonl$"):
        log.truncate_after(5)
    assert [json.loads(line) for line in log.path.read_text().splitlines()] == [{"step": 1}, {"step": 2}]
    assert log.damaged_path.read_bytes() == b'{"step": 3, "loss/ce": 0.\xe2\n'


def test_4_resume_after_a_partial_line_in_both_logs(capsys, run_copy):
    for name in ("metrics.jsonl", "steps.jsonl"):
        with (run_copy / name).open("a") as f:
            f.write('{"epoch": 2, "st')
    code, err = cli(capsys, "train", str(run_copy.parent / "c.toml"), "--out", str(run_copy), "--resume",
                    "--set", "run.epochs=2", "--quiet")
    assert code == 0, err
    records = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for line in (run_copy / "steps.jsonl").read_text().splitlines():
        json.loads(line)


# -- 5. empty or invalid --out ----------------------------------------------------------------------
@pytest.mark.parametrize("out", ["", "  "])
def test_5_empty_out_is_a_usage_error(capsys, tmp_path, monkeypatch, out):
    conf = write(tmp_path / "c.toml", runs.teacher_config(epochs=1))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    code, err = cli(capsys, "train", str(conf), "--out", out)
    assert code == 2 and "--out: must name a directory" in one_line(err)
    assert not any(work.iterdir())


def test_5_out_below_a_file_is_a_usage_error(capsys, tmp_path):
    conf = write(tmp_path / "c.toml", runs.teacher_config(epochs=1))
    code, err = cli(capsys, "train", str(conf), "--out", str(conf / "sub"))
    assert code == 2 and one_line(err).startswith("kdcore: error: --out: cannot create")


# -- 6. damaged checkpoints name the file and the problem -------------------------------------------
def _truncate(p):
    p.write_bytes(p.read_bytes()[:1000])


def _empty(p):
    p.write_bytes(b"")


def _text(p):
    p.write_text("not a checkpoint\n")


def _best(p):
    shutil.copy(p.parent / "best.pt", p)


def _junk(p):
    torch.save([1, 2, 3], p)


@pytest.mark.parametrize("damage, reason", [
    (_truncate, "truncated"), (_empty, "empty"), (_text, "not a PyTorch checkpoint"),
    (_best, "not a kdcore last.pt"), (_junk, "not a kdcore last.pt")])
def test_6_damaged_last_pt_exits_1_naming_the_file(capsys, run_copy, damage, reason):
    last = run_copy / "checkpoints" / "last.pt"
    damage(last)
    before = snapshot(run_copy)
    code, err = cli(capsys, "train", str(run_copy.parent / "c.toml"), "--out", str(run_copy), "--resume",
                    "--set", "run.epochs=2")
    assert code == 1
    line = one_line(err)
    assert str(last) in line and reason in line
    assert snapshot(run_copy) == before  # 8: nothing written by a failed resume


def test_6_last_pt_of_another_architecture_exits_2_naming_parameters(capsys, run_copy):
    code, err = cli(capsys, "train", str(run_copy.parent / "c.toml"), "--out", str(run_copy), "--resume",
                    "--set", "run.epochs=2", "--set", "student.hidden=[7]")
    assert code == 2
    line = one_line(err)
    assert line.startswith("kdcore: error: student:") and "'net.1.weight' is [32, 30] in the file, [7, 30]" in line


def test_6_load_checkpoint_checks_contents(tmp_path):
    with pytest.raises(DamagedCheckpoint, match="is a directory"):
        load_checkpoint(tmp_path)
    torch.save({"model": {}, "optimizer": {}, "epoch": "one", "step": 3}, tmp_path / "x.pt")
    with pytest.raises(DamagedCheckpoint, match="'epoch' and 'step' must be counts"):
        load_checkpoint(tmp_path / "x.pt")


# -- 7. config mistakes exit 2 with one line --------------------------------------------------------
@pytest.mark.parametrize("setting, expected", [
    ("run.seed=99999999999999999999", "run.seed: must be in 0 .. 2**63 - 1"),
    ("run.seed=-1", "run.seed: must be in 0 .. 2**63 - 1"),
    ("data.seed=99999999999999999999", "data.seed: must be in 0 .. 2**63 - 1"),
    ("run.epochs=99999999999999999999", "run.epochs: 99999999999999999999 is beyond the limit"),
])
def test_7_out_of_range_integers_exit_2(capsys, tmp_path, setting, expected):
    conf = write(tmp_path / "c.toml", runs.teacher_config(epochs=1))
    code, err = cli(capsys, "train", str(conf), "--out", str(tmp_path / "o"), "--set", setting)
    assert code == 2 and expected in one_line(err)
    assert not (tmp_path / "o").exists()


def test_7_deep_nesting_exits_2(capsys, tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text(tomli_w.dumps(runs.teacher_config(epochs=1)) + "\n[weighting]\nname = 'x'\nv = "
                    + "[" * 500 + "]" * 500 + "\n")
    code, err = cli(capsys, "train", str(conf), "--out", str(tmp_path / "o"))
    assert code == 2 and "nested more than 32 levels" in one_line(err)
    code, err = cli(capsys, "train", str(write(tmp_path / "ok.toml", runs.teacher_config(epochs=1))),
                    "--out", str(tmp_path / "o"), "--set", "data.v=" + "[" * 500 + "]" * 500)
    assert code == 2 and "nested more than 32 levels" in one_line(err)


def test_7_utf8_byte_order_mark_is_accepted(capsys, tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_bytes(b"\xef\xbb\xbf" + tomli_w.dumps(runs.teacher_config(epochs=1)).encode())
    code, err = cli(capsys, "train", str(conf), "--out", str(tmp_path / "o"), "--quiet")
    assert code == 0, err


def test_7_out_naming_an_existing_file_exits_2(capsys, tmp_path):
    conf = write(tmp_path / "c.toml", runs.teacher_config(epochs=1))
    before = conf.read_bytes()
    code, err = cli(capsys, "train", str(conf), "--out", str(conf))
    assert code == 2 and "exists and is not a directory" in one_line(err)
    assert conf.read_bytes() == before


# -- 8. an invalid resume writes nothing and is refused ---------------------------------------------
def test_8_resume_with_fewer_epochs_than_done_exits_2_and_writes_nothing(capsys, run_copy):
    before = snapshot(run_copy)
    for epochs in ("0", "1"):
        code, err = cli(capsys, "train", str(run_copy.parent / "c.toml"), "--out", str(run_copy), "--resume",
                        "--set", f"run.epochs={epochs}")
        assert code == 2
        assert "nothing to train" in one_line(err) or "must be > 0" in err
    assert snapshot(run_copy) == before


def test_8_resume_with_another_optimizer_is_refused(capsys, run_copy):
    code, err = cli(capsys, "train", str(run_copy.parent / "c.toml"), "--out", str(run_copy), "--resume",
                    "--set", "run.epochs=2", "--set", "optim.name=sgd")
    assert code == 2 and "optim.name:" in one_line(err) and "'adamw'" in err


def test_8_check_resume_accepts_more_epochs(finished):
    state = load_checkpoint(finished / "checkpoints" / "last.pt")
    conf = cfg.from_dict(runs.teacher_config(epochs=2))
    check_resume(state, conf)
    with pytest.raises(ConfigError, match="^run.epochs: 1 leaves nothing to train"):
        check_resume(state, cfg.from_dict(runs.teacher_config(epochs=1)))
    capped = runs.teacher_config(epochs=5)
    capped["run"]["max_steps"] = state["step"]
    with pytest.raises(ConfigError, match=rf"^run.max_steps: {state['step']} leaves nothing to train"):
        check_resume(state, cfg.from_dict(capped))


# -- 9. atomic writes honour the umask --------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_9_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.json", "{}")
        atomic_torch_save({"x": torch.zeros(1)}, tmp_path / "b.pt")
        JsonLines(tmp_path / "c.jsonl").append({"step": 1})
    finally:
        os.umask(old)
    for name in ("a.json", "b.pt", "c.jsonl"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_9_run_files_share_one_mode(finished):
    old = os.umask(0o022)
    os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in finished.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o666 & ~old}, modes


# -- 10. environment variables ----------------------------------------------------------------------
def test_10_flags_accept_only_documented_values():
    for raw in ("1", "true", "YES", " yes "):
        assert env_flag("KDCORE_DEBUG", {"KDCORE_DEBUG": raw})
    for raw in ("0", "false", "No", ""):
        assert not env_flag("KDCORE_DEBUG", {"KDCORE_DEBUG": raw})
    assert not env_flag("KDCORE_DEBUG", {})
    with pytest.raises(ConfigError, match=r"^KDCORE_STRICT_PLUGINS: must be 1/0, true/false or yes/no"):
        env_flag("KDCORE_STRICT_PLUGINS", {"KDCORE_STRICT_PLUGINS": "maybe"})


def test_10_debug_false_shows_no_traceback_and_odd_values_exit_2(capsys, monkeypatch):
    import kdcore.cli

    def boom(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(kdcore.cli.commands, "_cmd_list", boom)
    monkeypatch.setenv("KDCORE_DEBUG", "false")
    code, err = cli(capsys, "list")
    assert code == 1 and "Traceback" not in err and "boom" in err
    monkeypatch.setenv("KDCORE_DEBUG", "TRUE")
    code, err = cli(capsys, "list")
    assert code == 1 and "Traceback" in err
    monkeypatch.setenv("KDCORE_DEBUG", "2")
    code, err = cli(capsys, "list")
    assert code == 2 and "KDCORE_DEBUG: must be 1/0" in one_line(err)


def test_10_unknown_plugin_name_warns_or_fails_when_strict():
    with pytest.warns(PluginWarning, match=r"KDCORE_PLUGINS: no installed plugin is named 'nosuch'"):
        load_registry(env={"KDCORE_PLUGINS": "nosuch,builtin"}, entry_points=[])
    with pytest.raises(ConfigError, match=r"^KDCORE_PLUGINS: no installed plugin is named 'nosuch'"):
        load_registry(env={"KDCORE_PLUGINS": "nosuch", "KDCORE_STRICT_PLUGINS": "yes"}, entry_points=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_registry(env={"KDCORE_PLUGINS": "builtin"}, entry_points=[])


def test_10_environment_values_from_the_command_line():
    run = lambda env: subprocess.run([sys.executable, "-m", "kdcore", "list", "loss"], capture_output=True,
                                     text=True, env={**os.environ, **env}, timeout=300)
    out = run({"KDCORE_STRICT_PLUGINS": "sure"})
    assert out.returncode == 2 and "KDCORE_STRICT_PLUGINS: must be" in one_line(out.stderr)
    out = run({"KDCORE_PLUGINS": "nosuch"})
    assert out.returncode == 0 and "warning: kdcore: KDCORE_PLUGINS: no installed plugin is named" in out.stderr


# -- 11. SIGTERM is handled like SIGINT -------------------------------------------------------------
def test_11_sigterm_in_process_exits_143_with_a_message(capsys, monkeypatch):
    import kdcore.cli

    monkeypatch.setattr(kdcore.cli.commands, "_cmd_list", lambda args: os.kill(os.getpid(), signal.SIGTERM))
    code, err = cli(capsys, "list")
    assert code == 143 and "terminated by SIGTERM" in one_line(err) and "--resume" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_11_sigterm_leaves_a_run_that_resumes(tmp_path):
    conf = runs.teacher_config(epochs=100_000)
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "kdcore", "train", str(write(tmp_path / "c.toml", conf)),
                             "--out", str(out), "--quiet"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err
    assert "terminated by SIGTERM" in one_line(err)
    assert not (out / LOCK_FILE).exists()
    done = load_checkpoint(out / "checkpoints" / "last.pt")["epoch"]
    resumed = subprocess.run([sys.executable, "-m", "kdcore", "train", str(tmp_path / "c.toml"), "--out", str(out),
                              "--resume", "--set", f"run.epochs={done + 1}", "--quiet"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr


# -- 12. the run directory's config.toml runs from anywhere -----------------------------------------
def test_12_run_directory_config_reruns_from_another_directory(capsys, finished, tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    shutil.copytree(finished / "checkpoints", configs / "teacher")
    conf = write(configs / "student.toml", runs.student_config("teacher/best.pt", epochs=1))
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "train", str(conf), "--out", "s", "--quiet")
    assert code == 0, err
    saved = cfg.load(tmp_path / "s" / "config.toml")
    assert saved.teacher.checkpoint == str((configs / "teacher" / "best.pt").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, err = cli(capsys, "train", str(tmp_path / "s" / "config.toml"), "--out", "again", "--quiet")
    assert code == 0, err


# -- 13. a teacher architecture mismatch names parameters and shapes --------------------------------
def test_13_teacher_mismatch_names_the_first_parameters_and_shapes(capsys, finished, tmp_path):
    conf = runs.student_config(str(finished / "checkpoints" / "best.pt"), epochs=1)
    conf["teacher"]["hidden"] = [7, 5]
    code, err = cli(capsys, "train", str(write(tmp_path / "s.toml", conf)), "--out", str(tmp_path / "s"))
    assert code == 2
    line = one_line(err)
    assert line.startswith("kdcore: error: teacher.checkpoint:")
    assert "'net.1.weight' is [32, 30] in the file, [7, 30] in the model" in line
    assert "'net.5.weight' missing from the file (model [3, 5])" in line or "more)" in line


# -- 14. absurd sizes are refused before they exhaust memory ----------------------------------------
def test_14_huge_lists_are_refused_naming_the_key(capsys, tmp_path):
    conf = runs.teacher_config(epochs=1)
    conf["student"]["hidden"] = [1] * 17_500
    code, err = cli(capsys, "train", str(write(tmp_path / "c.toml", conf)), "--out", str(tmp_path / "o"))
    assert code == 2
    assert "student.hidden: a list of 17,500 entries is longer than the limit of 10,000" in one_line(err)


def test_14_huge_widths_are_refused_naming_the_key(capsys, tmp_path):
    conf = runs.teacher_config(epochs=1)
    conf["student"]["hidden"] = [2**40]
    code, err = cli(capsys, "train", str(write(tmp_path / "c.toml", conf)), "--out", str(tmp_path / "o"))
    assert code == 2 and "student.hidden[0]: 1099511627776 is beyond the limit" in one_line(err)


def test_14_a_model_no_memory_holds_is_a_config_error(capsys, tmp_path):
    from kdcore.engine.models import build_backbone

    class Registry:  # a backbone whose allocation fails, as torch reports it
        def get(self, kind, name):
            return type("C", (), {"factory": staticmethod(lambda **kw: None)})()

        def create(self, kind, name, **params):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    data = kdcore.create("dataset", "gaussian_mixture", n=60)
    with pytest.raises(ConfigError, match=r"^student: backbone 'mlp' with these parameters needs more memory"):
        build_backbone(cfg.ModelConfig("mlp"), "student", data, Registry(), None)


def test_14_config_files_over_the_size_limit_are_refused(tmp_path):
    big = tmp_path / "big.toml"
    with big.open("wb") as f:
        f.truncate(cfg.MAX_FILE_BYTES + 1)
    with pytest.raises(ConfigError, match="larger than the limit"):
        cfg.load(big)
