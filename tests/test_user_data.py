"""A user's own data and models without a plugin: the ``tensors``, ``csv`` and
``hf_disk`` datasets, ``python:MODULE:ATTRIBUTE`` components, and the report lines."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch

import kdcore
from kdcore.engine.loop import summary_line

_spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).with_name("helpers_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)


def blobs(n=200, dim=5, classes=3, seed=0):
    g = np.random.default_rng(seed)
    y = g.integers(0, classes, n)
    x = g.normal(size=(n, dim)).astype(np.float32) + 2.0 * np.eye(classes, dim)[y]
    return x, y


def data(name, **params):
    return kdcore.create("dataset", name, **params)


# -- tensors ------------------------------------------------------------------------------------
def test_tensors_from_npz_pt_and_npy(tmp_path):
    x, y = blobs()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    torch.save({"inputs": torch.from_numpy(x), "targets": torch.from_numpy(y)}, tmp_path / "d.pt")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    for splits in (data("tensors", path=str(tmp_path / "d.npz"), split=[0.5, 0.25, 0.25]),
                   data("tensors", path=str(tmp_path / "d.pt"), split=[0.5, 0.25, 0.25]),
                   data("tensors", inputs_path=str(tmp_path / "x.npy"), targets_path=str(tmp_path / "y.npy"),
                        split=[0.5, 0.25, 0.25])):
        assert (len(splits.train), len(splits.val), len(splits.test)) == (100, 50, 50)
        assert splits.num_classes == 3 and splits.input_shape == (5,)
        assert splits.train.inputs.dtype == torch.float32 and splits.train.targets.dtype == torch.long
        got = torch.cat([splits.train.targets, splits.val.targets, splits.test.targets]).sort().values
        assert torch.equal(got, torch.from_numpy(y).long().sort().values)  # every sample once


def test_tensors_with_explicit_split_files(tmp_path):
    x, y = blobs()
    np.savez(tmp_path / "train.npz", inputs=x[:150], targets=y[:150])
    np.savez(tmp_path / "val.npz", inputs=x[150:], targets=y[150:])
    splits = data("tensors", path=str(tmp_path / "train.npz"), val_path=str(tmp_path / "val.npz"))
    assert (len(splits.train), len(splits.val), splits.test) == (150, 50, None)


@pytest.mark.parametrize("content,match", [
    ({"x": np.zeros((4, 2)), "y": np.array([0, 1, 0])}, "4 inputs but 3 targets"),
    ({"x": np.zeros((4, 2)), "y": np.array([0, 1, 2, -1])}, "labels must be >= 0"),
    ({"x": np.zeros((4, 2)), "y": np.array([0, 1.5, 1, 0])}, "labels must be integers"),
    ({"x": np.zeros(4), "y": np.array([0, 1, 1, 0])}, r"inputs must be \[n, ...\]"),
    ({"x": np.full((4, 2), np.nan), "y": np.array([0, 1, 1, 0])}, "NaN or infinite"),
    ({"a": np.zeros((4, 2)), "y": np.array([0, 1, 1, 0])}, "no inputs key found"),
    ({"x": np.zeros((4, 2)), "y": np.zeros((4, 2))}, "one per sample"),
])
def test_malformed_tensor_files_name_the_file_and_the_problem(tmp_path, content, match):
    np.savez(tmp_path / "bad.npz", **content)
    with pytest.raises(kdcore.ConfigError, match=match) as info:
        data("tensors", path=str(tmp_path / "bad.npz"))
    assert "\n" not in str(info.value)


def test_tensor_file_errors(tmp_path):
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(kdcore.ConfigError, match=r"path: cannot read .*text\.pt"):
        data("tensors", path=str(tmp_path / "text.pt"))
    with pytest.raises(kdcore.ConfigError, match="path: file not found"):
        data("tensors", path=str(tmp_path / "missing.npz"))
    with pytest.raises(kdcore.ConfigError, match="either path"):
        data("tensors")
    x, y = blobs()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(kdcore.ConfigError, match="out of range for num_classes = 2"):
        data("tensors", path=str(tmp_path / "d.npz"), num_classes=2)
    with pytest.raises(kdcore.ConfigError, match="split: must be three"):
        data("tensors", path=str(tmp_path / "d.npz"), split=[0.5, 0.5])


# -- csv ----------------------------------------------------------------------------------------
def write_csv(path, rows, header="a,b,label"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return str(path)


def test_csv_numeric_and_named_labels(tmp_path):
    x, y = blobs(60, dim=2)
    numeric = write_csv(tmp_path / "n.csv", [f"{a},{b},{c}" for (a, b), c in zip(x, y)])
    s = data("csv", path=numeric, split=[0.5, 0.5, 0.0])
    assert (len(s.train), len(s.val), s.test, s.num_classes, s.input_shape) == (30, 30, None, 3, (2,))
    names = ["cat", "dog", "emu"]
    named = write_csv(tmp_path / "s.csv", [f"{a},{b},{names[c]}" for (a, b), c in zip(x, y)])
    s = data("csv", path=named, features=["b"], split=[1.0, 0.0, 0.0], label_names=True)
    assert s.meta["classes"] == names and s.input_shape == (1,)
    torch.testing.assert_close(s.train.inputs[:, 0].sort().values, torch.from_numpy(x[:, 1]).float().sort().values)


@pytest.mark.parametrize("rows,params,match", [
    (["1,2,0", "x,2,1"], {}, r"line 3, column 'a': 'x' is not a number"),
    (["1,2,0", "1,2"], {}, "line 3 has 2 fields, the header has 3"),
    (["1,2,0"], {"label": "klass"}, "no column 'klass' \\(columns: a, b, label\\)"),
    (["1,2,0"], {"features": ["a", "c"]}, "no column 'c'"),
    (["1,nan,0", "1,2,1"], {}, "NaN or infinite"),
    (["1,2,0", "1,2,0"], {}, "at least 2 classes"),
])
def test_malformed_csv(tmp_path, rows, params, match):
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(kdcore.ConfigError, match=match) as info:
        data("csv", path=path, **params)
    assert "bad.csv" in str(info.value) or "features" in str(info.value) or "label" in str(info.value)


# -- hf_disk ------------------------------------------------------------------------------------
def test_hf_disk_dataset_dict_and_single(tmp_path):
    datasets = pytest.importorskip("datasets")
    x, y = blobs(90, dim=4)
    full = datasets.Dataset.from_dict({"features": x.tolist(), "label": y.tolist()})
    dd = datasets.DatasetDict({"train": full.select(range(60)), "validation": full.select(range(60, 75)),
                               "test": full.select(range(75, 90))})
    dd.save_to_disk(str(tmp_path / "dd"))
    s = data("hf_disk", path=str(tmp_path / "dd"), inputs="features")
    assert (len(s.train), len(s.val), len(s.test), s.input_shape, s.num_classes) == (60, 15, 15, (4,), 3)
    full.save_to_disk(str(tmp_path / "one"))
    s = data("hf_disk", path=str(tmp_path / "one"), inputs="features", split=[0.6, 0.2, 0.2])
    assert len(s.train) == 54
    with pytest.raises(kdcore.ConfigError, match=r"label: .* has no column 'y' \(columns: features, label\)"):
        data("hf_disk", path=str(tmp_path / "one"), inputs="features", label="y")
    (tmp_path / "empty").mkdir()
    with pytest.raises(kdcore.ConfigError, match="is not a saved Hugging Face dataset"):
        data("hf_disk", path=str(tmp_path / "empty"))


# -- python: components -------------------------------------------------------------------------
MODELS = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes, in_features, width=16):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, num_classes))

        def forward(self, x):
            return self.body(x)
''')


def user_project(tmp_path):
    x, y = blobs(300, dim=6)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    (tmp_path / "my_models_for_test.py").write_text(MODELS)
    conf = {"run": {"seed": 0, "epochs": 2, "batch_size": 32, "progress": "off"},
            "data": {"name": "tensors", "path": "train.npz", "split": [0.8, 0.2, 0.0]},
            "student": {"backbone": "python:my_models_for_test:Net", "width": 8},
            "optim": {"name": "adamw", "lr": 3e-3},
            "loss": [{"name": "ce"}]}
    path = tmp_path / "cfg" / "run.toml"
    path.parent.mkdir()
    return conf, path


def test_python_backbone_beside_the_config_and_a_report_without_test_split(tmp_path, monkeypatch):
    conf, path = user_project(tmp_path)
    conf["data"]["path"] = "../train.npz"
    (path.parent / "my_models_for_test.py").write_text(MODELS)  # beside the config, not on sys.path
    path.write_text(tomli_w.dumps(conf))
    monkeypatch.chdir(tmp_path.parent)
    out = subprocess.run([sys.executable, "-m", "kdcore", "train", str(path), "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "nan" not in out.stdout
    assert "student val_acc" in out.stdout and "(no test split: validation split)" in out.stdout


def test_python_component_errors(tmp_path):
    conf, path = user_project(tmp_path)
    conf["data"]["path"] = str(tmp_path / "train.npz")
    for backbone, match in [("python:no_such_module_xyz:Net", "no module 'no_such_module_xyz' \\(looked in"),
                            ("python:my_models_for_test:Nett", "has no attribute 'Nett' \\(close matches: Net\\)"),
                            ("python:my_models_for_test", "expected 'python:MODULE:ATTRIBUTE'"),
                            ("python:my_models_for_test:torch", "is not a class or function")]:
        conf["student"]["backbone"] = backbone
        (path.parent / "my_models_for_test.py").write_text(MODELS)
        path.write_text(tomli_w.dumps(conf))
        with pytest.raises(kdcore.ConfigError, match="^student.backbone: .*" + match):
            kdcore.train(path, tmp_path / "r", quiet=True)


def test_teacher_accuracy_is_reported_next_to_the_students(tmp_path):
    kdcore.train(runs.teacher_config(epochs=1), tmp_path / "t", quiet=True)
    summary = kdcore.train(runs.student_config(str(tmp_path / "t" / "checkpoints" / "best.pt"), epochs=1),
                           tmp_path / "s", quiet=True)
    line = summary_line(summary)
    assert summary["report_split"] == "test" and "teacher_test_acc" in summary
    assert line.startswith("done: student test_acc ") and ", teacher test_acc " in line and "tv to the truth" in line


# -- the examples -------------------------------------------------------------------------------
USER_EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "user_data"


@pytest.mark.parametrize("name", ["csv", "npz", "hf_disk", "python_model"])
def test_user_data_examples_run(tmp_path, name):
    if name == "hf_disk":
        pytest.importorskip("datasets")
    import shutil

    for f in USER_EXAMPLES.iterdir():
        if f.suffix in (".toml", ".py"):
            shutil.copy(f, tmp_path / f.name)
    subprocess.run([sys.executable, str(tmp_path / "make_files.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=120)
    summary = kdcore.train(tmp_path / f"{name}.toml", tmp_path / "run", ["run.epochs=2"], quiet=True)
    assert summary["report_split"] == "test" and summary["test_acc"] > 0.5


def test_python_dataset_factory(tmp_path):
    (tmp_path / "my_data_for_test.py").write_text(textwrap.dedent('''
        import torch
        from kdcore.data import DataSplits, TensorSplit

        def make(n=120):
            g = torch.Generator().manual_seed(0)
            y = torch.arange(n) % 2
            x = torch.randn(n, 4, generator=g) + 2.0 * y.unsqueeze(1)
            return DataSplits(TensorSplit(x[:100], y[:100]), TensorSplit(x[100:], y[100:]), None,
                              num_classes=2, input_shape=(4,))
    '''))
    conf = {"run": {"seed": 0, "epochs": 2, "batch_size": 20, "progress": "off"},
            "data": {"name": "python:my_data_for_test:make", "n": 120},
            "student": {"backbone": "mlp", "hidden": [8]},
            "optim": {"name": "adamw", "lr": 1e-2}, "loss": [{"name": "ce"}]}
    path = tmp_path / "run.toml"
    path.write_text(tomli_w.dumps(conf))
    summary = kdcore.train(path, tmp_path / "run", quiet=True)
    assert summary["report_split"] == "val" and summary["val_acc"] > 0.5
