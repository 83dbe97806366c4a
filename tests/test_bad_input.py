"""Bad input is one line and exit 2, before any work: non-finite parameters of any
component, config files that are not regular files, CSV and tensor files with
damaged columns, labels or layouts, and sizes no memory holds. Each test injects
the fault and runs ``kdcore train`` in this process."""

from __future__ import annotations

import importlib.util
import os
import resource
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch

import kdcore
from kdcore import config as cfg
from kdcore.cli import main
from kdcore.common import params
from kdcore.engine import build_objective

_spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).with_name("helpers_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)


def train(capsys, tmp_path: Path, conf: dict | Path, *overrides: str) -> tuple[int, str]:
    """``kdcore train CONFIG [--set ...]`` in this process: (exit status, its one error line).

    The run directory must not exist afterwards: the input was refused before any work."""
    path = conf if isinstance(conf, Path) else tmp_path / "c.toml"
    if not isinstance(conf, Path):
        path.write_text(tomli_w.dumps(conf))
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["train", str(path), "--out", str(out), *(a for o in overrides for a in ("--set", o))])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not out.exists()
    return code, lines[0]


def kd_config() -> dict:
    """A distillation config; its teacher checkpoint is never reached."""
    return runs.student_config("missing-teacher.pt", epochs=1)


# -- 1. inf and nan in any component's parameters -----------------------------------------------
@pytest.mark.parametrize("where, value, message", [
    (("loss", 1, "temperature"), float("inf"), "loss[1].temperature: must be finite, got inf"),
    (("loss", 1, "schedule"), {"name": "linear", "start": float("nan")},
     "loss[1].schedule.start: must be finite, got nan"),
    (("loss", 1, "transforms"), [{"name": "label_smoothing", "delta": float("nan")}],
     "loss[1].transforms[0].delta: must be finite, got nan"),
    (("data", None, "split"), [0.9, float("inf"), 0.05], "data.split[1]: must be finite, got inf"),
    (("student", None, "dropout"), float("-inf"), "student.dropout: must be finite, got -inf"),
])
def test_non_finite_parameters_in_the_file_name_the_key(capsys, tmp_path, where, value, message):
    conf = kd_config()
    section, index, name = where
    (conf[section][index] if index is not None else conf[section])[name] = value
    code, line = train(capsys, tmp_path, conf)
    assert code == 2 and line == f"kdcore: error: {message}"


@pytest.mark.parametrize("override, message", [
    ("loss[1].temperature=inf", "loss[1].temperature: must be finite, got inf"),
    ("loss[1].temperature=nan", "loss[1].temperature: must be finite, got nan"),
    ("loss[1].transforms=[{name = 'temperature', temperature = -inf}]",
     "loss[1].transforms[0].temperature: must be finite, got -inf"),
    ("student.hidden=[8, nan]", "student.hidden[1]: must be finite, got nan"),
])
def test_non_finite_parameters_from_set_name_the_key(capsys, tmp_path, override, message):
    code, line = train(capsys, tmp_path, kd_config(), override)
    assert code == 2 and line == f"kdcore: error: {message}"


def test_non_finite_parameters_of_open_ended_user_components_are_refused(capsys, tmp_path):
    """A ``**options`` factory takes any key, but not an infinite value."""
    (tmp_path / "open_data_for_bad_input.py").write_text(textwrap.dedent('''
        from kdcore.builtin.datasets import gaussian_mixture

        def make(**options):
            return gaussian_mixture(n=60)
    '''))
    conf = runs.teacher_config(epochs=1)
    conf["data"] = {"name": "python:open_data_for_bad_input:make", "scale": {"low": 0.5, "high": float("inf")}}
    code, line = train(capsys, tmp_path, conf)
    assert code == 2 and line == "kdcore: error: data.scale.high: must be finite, got inf"


def test_non_finite_parameters_through_the_python_api():
    with pytest.raises(kdcore.ConfigError, match=r"^temperature: must be finite, got inf$"):
        kdcore.create("loss", "kd", temperature=float("inf"))
    with pytest.raises(kdcore.ConfigError, match=r"^transforms\[0\]\.delta: must be finite, got nan$"):
        kdcore.create("loss", "kd", transforms=[{"name": "label_smoothing", "delta": float("nan")}])
    with pytest.raises(kdcore.ConfigError, match=r"^loss\[0\]\.temperature: must be finite, got nan$"):
        build_objective([{"name": "kd", "temperature": float("nan")}])
    assert kdcore.create("loss", "kd", temperature=2.0).temperature == 2.0


# -- 2. config files that are not regular files -------------------------------------------------
def limit_memory() -> None:
    """In the child: at most 2 GiB of data, so that reading without a bound ends in a
    MemoryError (exit 1) there instead of exhausting the machine."""
    resource.setrlimit(resource.RLIMIT_DATA, (2 * 2**30, 2 * 2**30))


def test_endless_device_as_config_is_refused_at_the_size_limit(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kdcore", "train", "/dev/zero", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, preexec_fn=limit_memory, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (f"kdcore: error: /dev/zero: config file is larger than the limit of "
                                  f"{cfg.MAX_FILE_BYTES:,} bytes")
    assert not (tmp_path / "out").exists()


def feed(fifo: Path, data: bytes) -> threading.Thread:
    """A thread that writes ``data`` into ``fifo`` (stopping where the reader leaves)."""
    def write() -> None:
        try:
            with open(fifo, "wb") as f:
                for at in range(0, len(data), 2**20):
                    f.write(data[at:at + 2**20])
        except BrokenPipeError:
            pass

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def release(fifo: Path, thread: threading.Thread) -> None:
    """Let a writer still waiting for a reader go (then it meets a closed pipe), and join it."""
    if thread.is_alive():
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
    thread.join(10)


def test_fifo_fed_more_than_the_limit_is_refused(capsys, tmp_path):
    fifo = tmp_path / "c.toml"
    os.mkfifo(fifo)
    writer = feed(fifo, b"# " + b"x" * (cfg.MAX_FILE_BYTES + 2**20) + b"\n")
    try:
        code, line = train(capsys, tmp_path, fifo)
    finally:
        release(fifo, writer)
    assert code == 2
    assert line == f"kdcore: error: {fifo}: config file is larger than the limit of {cfg.MAX_FILE_BYTES:,} bytes"


def test_fifo_with_a_config_is_read(tmp_path):
    """A FIFO (or ``<(...)`` in a shell) holding a config within the limit is a config."""
    fifo = tmp_path / "c.toml"
    os.mkfifo(fifo)
    writer = feed(fifo, tomli_w.dumps(runs.teacher_config(epochs=3)).encode())
    try:
        conf = cfg.load(fifo)
    finally:
        release(fifo, writer)
    assert conf.run.epochs == 3 and conf.data.params == {"n": 600}


# -- 3. CSV files: repeated columns and labels ----------------------------------------------------
def csv_config(tmp_path: Path, header: str, rows: list[str], **params) -> dict:
    (tmp_path / "d.csv").write_text("\n".join([header, *rows]) + "\n")
    conf = runs.teacher_config(epochs=1)
    conf["data"] = {"name": "csv", "path": str(tmp_path / "d.csv"), **params}
    return conf


ROWS = [f"{i % 7}.5,{i % 5}.25,{i % 2}" for i in range(20)]


def test_csv_with_a_repeated_column_name_is_refused(capsys, tmp_path):
    code, line = train(capsys, tmp_path, csv_config(tmp_path, "a,a,label", ROWS))
    assert code == 2 and line == (f"kdcore: error: data.path: {tmp_path / 'd.csv'}: column 'a' appears twice in the "
                                  "header (columns 1 and 2); give each column its own name")


def test_csv_label_typo_among_integers_names_the_line(capsys, tmp_path):
    rows = list(ROWS)
    rows[6] = "1.5,2.5,1O"
    code, line = train(capsys, tmp_path, csv_config(tmp_path, "a,b,label", rows))
    assert code == 2 and line == (f"kdcore: error: data.path: {tmp_path / 'd.csv'} line 8, column 'label': '1O' is "
                                  "not an integer class label; correct it, or set label_names = true if the labels "
                                  "are names")


def test_csv_class_names_need_label_names(capsys, tmp_path):
    rows = [f"{i}.5,{i}.25,{('cat', 'dog')[i % 2]}" for i in range(20)]
    code, line = train(capsys, tmp_path, csv_config(tmp_path, "a,b,label", rows))
    assert code == 2 and line == (f"kdcore: error: data.label_names: {tmp_path / 'd.csv'}: column 'label' holds names "
                                  "('cat', ...), not class numbers; set label_names = true to number the names in "
                                  "sorted order")
    named = kdcore.create("dataset", "csv", path=str(tmp_path / "d.csv"), label_names=True, split=[1.0, 0.0, 0.0])
    assert named.meta["classes"] == ["cat", "dog"] and named.num_classes == 2


def test_csv_labels_written_as_whole_floats_are_integers(tmp_path):
    (tmp_path / "d.csv").write_text("a,label\n" + "\n".join(f"{i}.5,{i % 3}.0" for i in range(9)) + "\n")
    splits = kdcore.create("dataset", "csv", path=str(tmp_path / "d.csv"), split=[1.0, 0.0, 0.0])
    assert splits.num_classes == 3 and "classes" not in splits.meta
    with pytest.raises(kdcore.ConfigError, match=r"^label_names: must be true or false, got 'yes'$"):
        kdcore.create("dataset", "csv", path=str(tmp_path / "d.csv"), label_names="yes")
    (tmp_path / "e.csv").write_text("a,label\n1,0\n2,\n3,1\n")
    with pytest.raises(kdcore.ConfigError, match=r"e\.csv line 3, column 'label': the label is empty$"):
        kdcore.create("dataset", "csv", path=str(tmp_path / "e.csv"), label_names=True)


def test_csv_label_beyond_the_samples_names_the_line(capsys, tmp_path):
    rows = list(ROWS)
    rows[3] = "1.5,2.5,2000000000"
    code, line = train(capsys, tmp_path, csv_config(tmp_path, "a,b,label", rows))
    assert code == 2 and line == (f"kdcore: error: data.path: {tmp_path / 'd.csv'}: column 'label': label 2000000000 "
                                  "at line 5 is beyond the 20 samples (it would make 2,000,000,001 classes); correct "
                                  "it, or give num_classes")


# -- 4. tensor files: sparse tensors and absurd labels ---------------------------------------------
def tensors_config(tmp_path: Path, content) -> dict:
    torch.save(content, tmp_path / "d.pt")
    conf = runs.teacher_config(epochs=1)
    conf["data"] = {"name": "tensors", "path": str(tmp_path / "d.pt")}
    return conf


def dense() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g)
    return x * (x > 0.5), torch.arange(40) % 3


@pytest.mark.parametrize("content, key", [
    (lambda x, y: {"x": x.to_sparse(), "y": y}, "x"),
    (lambda x, y: {"inputs": x.to_sparse_csr(), "targets": y}, "inputs"),
    (lambda x, y: {"x": x, "labels": y.to_sparse()}, "labels"),
    (lambda x, y: (x.to_sparse(), y), "the pair's inputs"),
])
def test_sparse_tensors_are_one_line(capsys, tmp_path, content, key):
    code, line = train(capsys, tmp_path, tensors_config(tmp_path, content(*dense())))
    assert code == 2 and line == (f"kdcore: error: data.path: {tmp_path / 'd.pt'}: {key} is a sparse tensor; save it "
                                  "dense (tensor.to_dense())")


def test_label_beyond_the_samples_names_the_data_not_the_model(capsys, tmp_path):
    x, y = dense()
    y[17] = 2_000_000_000
    code, line = train(capsys, tmp_path, tensors_config(tmp_path, {"x": x, "y": y}))
    assert code == 2 and line == (f"kdcore: error: data.path: {tmp_path / 'd.pt'}: targets: label 2000000000 at "
                                  "sample 17 is beyond the 40 samples (it would make 2,000,000,001 classes); correct "
                                  "it, or give num_classes")


def test_negative_label_names_its_sample(capsys, tmp_path):
    x, y = dense()
    y[5] = -3
    code, line = train(capsys, tmp_path, tensors_config(tmp_path, {"x": x, "y": y}))
    assert code == 2 and line.endswith("d.pt: targets: labels must be >= 0, found -3 at sample 5")


# -- 5. sizes no memory holds -----------------------------------------------------------------------
def test_gaussian_mixture_larger_than_memory_is_refused_before_allocating(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(params, "physical_memory", lambda: 8 * 2**30)  # a machine of 8 GiB
    conf = runs.teacher_config(epochs=1)
    conf["data"]["n"] = 2_000_000_000
    code, line = train(capsys, tmp_path, conf)
    assert code == 2 and line == ("kdcore: error: data.n: 2000000000 needs about 886.6 GiB of memory with these "
                                  "parameters, more than this machine's 8.0 GiB; lower it")
    conf["data"]["n"] = 2e9  # TOML's 2e9 is a float
    code, line = train(capsys, tmp_path, conf)
    assert code == 2 and line == "kdcore: error: data.n: must be a positive integer, got 2000000000.0"


HUGE = textwrap.dedent('''
    import torch
    from torch import nn
    from kdcore.builtin.datasets import gaussian_mixture

    def make(n=60):
        torch.empty(n, 10**9, dtype=torch.uint8)  # n GB: 2e9 of them fit no address space
        return gaussian_mixture(n=60)

    class Net(nn.Module):
        def __init__(self, num_classes, in_features, width=8):
            super().__init__()
            self.table = nn.Parameter(torch.empty(width, 10**9, dtype=torch.uint8), requires_grad=False)
            self.out = nn.Linear(in_features, num_classes)

        def forward(self, x):
            return self.out(x)
''')


@pytest.mark.parametrize("section, params, message", [
    ("data", {"name": "python:huge_for_bad_input:make", "n": 2_000_000_000},
     "data.n: 2000000000 needs more memory than there is (dataset 'python:huge_for_bad_input:make' asked for "
     "2,000,000,000,000,000,000 bytes); lower it"),
    ("student", {"backbone": "python:huge_for_bad_input:Net", "width": 2_000_000_000},
     "student.width: 2000000000 needs more memory than there is (backbone 'python:huge_for_bad_input:Net' asked "
     "for 2,000,000,000,000,000,000 bytes); lower it"),
])
def test_user_component_with_a_size_no_memory_holds_names_the_key(capsys, tmp_path, section, params, message):
    """Sizes of 2e18 bytes: the allocation fails at once on any machine."""
    (tmp_path / "huge_for_bad_input.py").write_text(HUGE)
    conf = runs.teacher_config(epochs=1)
    conf[section] = params
    code, line = train(capsys, tmp_path, conf)
    assert code == 2 and line == f"kdcore: error: {message}"
