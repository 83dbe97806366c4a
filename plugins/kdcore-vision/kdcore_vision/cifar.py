"""Datasets ``cifar10`` and ``cifar100`` (Krizhevsky 2009) from a local copy of the
"python version" archives, downloaded by torchvision only when ``download = true``.

Training images get the standard augmentation (zero-pad 4, random 32x32 crop,
horizontal flip; He et al. 2016 sec. 4.2) and every split per-channel normalisation.
As in the KD literature (CRD, DKD, NKD, ABKD report the best or last test accuracy),
``val`` is the test set unless ``val_split`` holds out part of the training set.
"""

from __future__ import annotations

import pickle
from pathlib import Path

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


def read_batch(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 [n, 3, 32, 32]`` and labels of one pickled CIFAR batch file."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return torch.from_numpy(images.copy()), torch.as_tensor(batch[label_key], dtype=torch.long)


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
    parts = [read_batch(base / folder / f, label_key) for f in train_files]
    train_x, train_y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    test_x, test_y = read_batch(base / folder / test_file, label_key)
    with open(base / folder / meta_file, "rb") as f:
        classes = list(pickle.load(f, encoding="latin1")[names_key])
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
