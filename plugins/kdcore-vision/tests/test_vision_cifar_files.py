"""CIFAR's pickles are untrusted input: files in the archives' own format (Python 2
pickles of numpy arrays) load, and a file that names anything else, or is damaged, is
refused with exit 2 naming the file, before any of its code runs."""

from __future__ import annotations

import io
import pickle
import pickletools
import struct

import numpy as np
import pytest
import torch

from kdcore.cli import main
from kdcore_vision import cifar


class Python2Pickler(pickle._Pickler):
    """Protocol 2 with ``bytes`` written as Python 2's ``str`` (SHORT_BINSTRING /
    BINSTRING): the opcodes of the archives, which were pickled by Python 2's cPickle."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def python2_pickle(obj) -> bytes:
    """``obj`` as the archives hold it: keys and names as Python 2 strings, arrays rebuilt by
    ``numpy.core.multiarray._reconstruct`` (numpy 1's path, as in the real files)."""
    buf = io.BytesIO()
    Python2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def write_python2_cifar(root, name, n=5, classes=3):
    """A tiny copy of the archive ``name`` in the real files' pickle format; returns its images."""
    folder, train_files, test_file, meta_file, label_key, names_key, *_ = cifar.LAYOUT[name]
    d = root / folder
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    images = {}
    for i, fname in enumerate([*train_files, test_file]):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        images[fname] = data
        batch = {b"batch_label": b"batch %d" % i, b"data": data, label_key.encode(): [j % classes for j in range(n)],
                 b"filenames": [b"img_%d.png" % j for j in range(n)]}
        (d / fname).write_bytes(python2_pickle(batch))
    (d / meta_file).write_bytes(python2_pickle({names_key.encode(): [b"c%d" % k for k in range(classes)]}))
    return d, images


def globals_named(data: bytes) -> set[str]:
    """The ``module.name`` globals a protocol-2 pickle refers to."""
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def train_config(tmp_path, name="cifar10"):
    conf = tmp_path / "c.toml"
    conf.write_text(f'[run]\nepochs = 1\nbatch_size = 4\ndevice = "cpu"\n\n'
                    f'[data]\nname = "{name}"\nroot = "{tmp_path / "data"}"\naugment = false\n\n'
                    f'[student]\nbackbone = "resnet8"\nnum_classes = 10\n\n[[loss]]\nname = "ce"\n')
    return str(conf)


def refused(capsys, tmp_path, name="cifar10") -> str:
    """``kdcore train`` on the copy under ``tmp_path/data``: asserts exit 2, returns stderr."""
    capsys.readouterr()
    code = main(["train", train_config(tmp_path, name), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_files_in_the_archives_format_load(tmp_path, name):
    d, images = write_python2_cifar(tmp_path, name)
    _, train_files, test_file, *_ = cifar.LAYOUT[name]
    assert globals_named((d / test_file).read_bytes()) == {"numpy.core.multiarray._reconstruct", "numpy.ndarray",
                                                            "numpy.dtype"}
    splits = cifar.load(name, str(tmp_path), download=False, augment=False, val_split=0.0, seed=0)
    expected = np.concatenate([images[f] for f in train_files]).reshape(-1, 3, 32, 32)
    assert torch.equal(splits.train.images, torch.from_numpy(expected))
    assert torch.equal(splits.test.images, torch.from_numpy(images[test_file].reshape(-1, 3, 32, 32)))
    assert splits.test.labels.tolist() == [0, 1, 2, 0, 1] and splits.meta["classes"] == ["c0", "c1", "c2"]


class Payload:
    """What a hostile batch file holds: unpickling it with ``pickle.load`` creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_a_batch_that_would_run_code_is_refused_and_never_runs(tmp_path, capsys):
    d, _ = write_python2_cifar(tmp_path / "data", "cifar10")
    marker = tmp_path / "ran"
    batch = d / "data_batch_1"
    batch.write_bytes(python2_pickle({b"data": np.zeros((5, 3072), np.uint8), b"labels": Payload(marker)}))
    err = refused(capsys, tmp_path)
    assert err == (f"kdcore: error: data.root: {batch} is not a CIFAR file of cifar-10-python.tar.gz (its pickle names "
                   "__builtin__.exec, which a CIFAR file never holds; refused before anything ran); extract "
                   "cifar-10-python.tar.gz (the python version) into root again\n")
    assert not marker.exists() and not (tmp_path / "run").exists()
    with open(batch, "rb") as f:  # the file is what it claims: an ordinary unpickler runs it
        pickle.load(f, encoding="latin1")
    assert marker.exists()


def test_a_damaged_batch_names_the_file(tmp_path, capsys):
    d, _ = write_python2_cifar(tmp_path / "data", "cifar100")
    batch = d / "train"
    batch.write_bytes(batch.read_bytes()[:-200])  # cut inside the array's bytes
    err = refused(capsys, tmp_path, "cifar100")
    assert err.startswith(f"kdcore: error: data.root: {batch} is not a CIFAR file of cifar-100-python.tar.gz (")
    assert err.endswith("); extract cifar-100-python.tar.gz (the python version) into root again\n")
    assert err.count("\n") == 1


@pytest.mark.parametrize("content, why", [
    ({"data": np.zeros((5, 3072), np.float32), "labels": [0] * 5}, "'data' is not a uint8 array [n, 3072], "
     "got ndarray float32 (5, 3072)"),
    ({"data": np.zeros((5, 3072), np.uint8), "labels": [0] * 4}, "'labels' is not a list of 5 integer labels"),
    ({"data": np.zeros((5, 3072), np.uint8)}, "no 'labels' entry"),
    ([1, 2, 3], "no 'data' entry"),
])
def test_a_batch_of_another_shape_names_the_file_and_the_entry(tmp_path, capsys, content, why):
    d, _ = write_python2_cifar(tmp_path / "data", "cifar10")
    batch = d / "test_batch"
    batch.write_bytes(python2_pickle(content))
    assert refused(capsys, tmp_path) == (f"kdcore: error: data.root: {batch} is not a CIFAR file of "
                                         f"cifar-10-python.tar.gz ({why}); extract cifar-10-python.tar.gz "
                                         "(the python version) into root again\n")
