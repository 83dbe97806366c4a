"""Datasets ``cifar10`` and ``cifar100`` (Krizhevsky 2009) from a local copy of the
"python version" archives, downloaded by torchvision only when ``download = true``.

Training images get the standard augmentation (zero-pad 4, random 32x32 crop,
horizontal flip; He et al. 2016 sec. 4.2) and every split per-channel normalisation.
As in the KD literature (CRD, DKD, NKD, ABKD report the best or last test accuracy),
``val`` is the test set unless ``val_split`` holds out part of the training set.

The files are pickles, read by :class:`CifarUnpickler`, which builds only what the
format holds, so a file under ``root`` that would run code when unpickled is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcore.common import params
from kdcore.common.errors import ConfigError
from kdcore.data import DataSplits
from kdcore_vision.image_split import ImageTensorSplit

#: name -> (folder, train files, test file, meta file, label key, class-name key, mean, std)
LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "batches.meta", "labels", "label_names",
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names",
                 (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
ARCHIVE = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}


#: numpy's array rebuilder, the function an array's pickle calls (taken from numpy, whatever its path)
RECONSTRUCT = np.zeros(0).__reduce__()[0]
#: the globals a CIFAR pickle names, (module, name) -> object: the rebuilder (under numpy 1's
#: path, which the archives' Python 2 pickles use, and numpy 2's), ``ndarray`` and ``dtype``
SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class CifarUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR's python-version files: dicts, lists, strings, numbers and
    numpy arrays. Every other global is refused where the pickle names it, before
    anything it would build or call exists, so a ``__reduce__`` in the file never runs."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"its pickle names {module}.{name}, which a CIFAR file never holds; "
                                         "refused before anything ran") from None


def refuse(path: Path, archive: str, why: str) -> ConfigError:
    """The one-line error for a file under ``root`` that is not what ``archive`` holds."""
    why = " ".join(why.split())
    return ConfigError(f"root: {path} is not a CIFAR file of {archive} ({why}); "
                       f"extract {archive} (the python version) into root again")


def read_pickle(path: Path, archive: str) -> Any:
    """The object pickled in ``path``, through :class:`CifarUnpickler` (keys decoded as latin-1,
    as the archives' Python 2 pickles need)."""
    try:
        with open(path, "rb") as f:
            return CifarUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # whatever unpickling raises comes from the file's bytes
        raise refuse(path, archive, str(exc) or type(exc).__name__) from None


def field(obj: Any, key: str, path: Path, archive: str) -> Any:
    """``obj[key]`` of a CIFAR file's dict, or the error naming the file."""
    if not isinstance(obj, dict) or key not in obj:
        raise refuse(path, archive, f"no {key!r} entry")
    return obj[key]


def read_batch(path: Path, label_key: str, archive: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 [n, 3, 32, 32]`` and labels of one pickled CIFAR batch file."""
    batch = read_pickle(path, archive)
    data, labels = field(batch, "data", path, archive), field(batch, label_key, path, archive)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise refuse(path, archive, f"'data' is not a uint8 array [n, 3072], got {type(data).__name__} "
                                    f"{getattr(data, 'dtype', '')} {tuple(getattr(data, 'shape', ()))}")
    if not (isinstance(labels, list) and len(labels) == len(data) and all(type(y) is int for y in labels)):
        raise refuse(path, archive, f"{label_key!r} is not a list of {len(data)} integer labels")
    images = data.reshape(-1, 3, 32, 32)
    return torch.from_numpy(images.copy()), torch.as_tensor(labels, dtype=torch.long)


def fetch(name: str, root: Path) -> None:
    """Download and extract the archive into ``root`` with torchvision (checks its MD5)."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        cls(str(root), train=True, download=True)
    except Exception as exc:  # network or disk failure: tell the user how to fix it by hand
        raise ConfigError(f"download: fetching {ARCHIVE[name]} into {root} failed ({exc}); "
                          f"download it by hand and extract it into root") from exc


def load(name: str, root: str, download: bool, augment: bool, val_split: float, seed: int) -> DataSplits:
    folder, train_files, test_file, meta_file, label_key, names_key, mean, std = LAYOUT[name]
    if not isinstance(root, str):
        raise ConfigError(f"root: must be a path string, got {root!r}")
    if not isinstance(download, bool):
        raise ConfigError(f"download: must be true or false, got {download!r}")
    if not isinstance(augment, bool):
        raise ConfigError(f"augment: must be true or false, got {augment!r}")
    val_split = params.in_range("val_split", val_split, 0.0, 1.0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed: must be an integer, got {seed!r}")
    base = Path(root).expanduser()
    wanted = [*train_files, test_file, meta_file]
    if download and any(not (base / folder / f).is_file() for f in wanted):
        fetch(name, base)
    missing = [f for f in wanted if not (base / folder / f).is_file()]
    if missing:
        raise ConfigError(
            f"root: {name} not found: expected {base / folder}/{{{','.join(wanted)}}} "
            f"(missing: {', '.join(missing)}). Extract {ARCHIVE[name]} (the python version, "
            f"https://www.cs.toronto.edu/~kriz/cifar.html) into {base}, or set download = true")
    parts = [read_batch(base / folder / f, label_key, ARCHIVE[name]) for f in train_files]
    train_x, train_y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    test_x, test_y = read_batch(base / folder / test_file, label_key, ARCHIVE[name])
    meta = base / folder / meta_file
    classes = field(read_pickle(meta, ARCHIVE[name]), names_key, meta, ARCHIVE[name])
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise refuse(meta, ARCHIVE[name], f"{names_key!r} is not a list of class names")
    test = ImageTensorSplit(test_x, test_y, mean, std)
    if val_split > 0:
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
        n_val = int(round(val_split * len(train_y)))
        if not 0 < n_val < len(train_y):
            raise ConfigError(f"val_split: {val_split} leaves an empty split of {len(train_y)} images")
        held, kept = order[:n_val], order[n_val:]
        val = ImageTensorSplit(train_x[held], train_y[held], mean, std)
        train_x, train_y = train_x[kept], train_y[kept]
    else:
        val = test
    train = ImageTensorSplit(train_x, train_y, mean, std, augment=augment)
    return DataSplits(train, val, test, num_classes=len(classes), input_shape=(3, 32, 32),
                      meta={"classes": classes, "mean": mean, "std": std, "val_is_test": val is test})


def cifar10(root: str = "data", download: bool = False, augment: bool = True, val_split: float = 0.0,
            seed: int = 0) -> DataSplits:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (50,000 train / 10,000 test images, 10 classes)."""
    return load("cifar10", root, download, augment, val_split, seed)


def cifar100(root: str = "data", download: bool = False, augment: bool = True, val_split: float = 0.0,
             seed: int = 0) -> DataSplits:
    """CIFAR-100 from ``root/cifar-100-python`` (50,000 train / 10,000 test images, 100 fine classes)."""
    return load("cifar100", root, download, augment, val_split, seed)
