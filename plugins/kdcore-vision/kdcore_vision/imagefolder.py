"""Dataset ``imagefolder``: images in class sub-folders, ``root/{train,val}[/test]/CLASS/*.jpg``.

Class indices come from the sorted sub-folders of ``train/``; ``val/`` and ``test/``
may hold any subset of those classes. ``augment`` picks the training augmentation:
``"imagenet"`` (random resized crop + flip; evaluation resizes to ``image_size /
0.875`` and centre-crops), ``"cifar"`` (resize to ``image_size``, zero-pad by 1/8, random
crop, flip; evaluation only resizes) or ``"none"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision import datasets
from torchvision.transforms import v2

from kdcore.common import params
from kdcore.common.errors import ConfigError
from kdcore.data import DataSplits

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def transforms(image_size: int, augment: str, train: bool, mean: Sequence[float], std: Sequence[float]):
    """The v2 transform pipeline of one split."""
    if augment == "imagenet":
        geometry = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()] if train \
            else [v2.Resize(round(image_size / 0.875), antialias=True), v2.CenterCrop(image_size)]
    else:
        geometry = [v2.Resize((image_size, image_size), antialias=True)]
        if train and augment == "cifar":
            pad = max(1, image_size // 8)
            geometry += [v2.RandomCrop(image_size, padding=pad), v2.RandomHorizontalFlip()]
    return v2.Compose([v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(mean), list(std))])


class ClassFolder(datasets.ImageFolder):
    """An ImageFolder whose labels follow ``class_to_idx`` (``None``: its own sorted sub-folders)."""

    def __init__(self, path: Path, class_to_idx: dict[str, int] | None, transform):
        self.fixed_classes = class_to_idx
        try:
            super().__init__(str(path), transform=transform, allow_empty=class_to_idx is not None)
        except FileNotFoundError as exc:
            raise ConfigError(f"root: {path}: {exc}") from exc

    def find_classes(self, directory):
        found = sorted(e.name for e in Path(directory).iterdir() if e.is_dir())
        if self.fixed_classes is None:
            return found, {c: i for i, c in enumerate(found)}
        unknown = sorted(set(found) - set(self.fixed_classes))
        if unknown:
            raise ConfigError(f"root: {directory} has class folders not in train/: {', '.join(unknown)}")
        return list(self.fixed_classes), self.fixed_classes


def imagefolder(root: str, image_size: int = 224, augment: str = "imagenet",
                mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> DataSplits:
    """Splits ``train`` (augmented), ``val`` and, where ``root/test`` exists, ``test``."""
    if not isinstance(root, str):
        raise ConfigError(f"root: must be a path string, got {root!r}")
    params.positive_int("image_size", image_size)
    params.one_of("augment", augment, ("imagenet", "cifar", "none"))
    for key, value in (("mean", mean), ("std", std)):
        if len(value) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise ConfigError(f"{key}: must be three numbers (per RGB channel), got {list(value)!r}")
    if any(s <= 0 for s in std):
        raise ConfigError(f"std: must be > 0, got {list(std)!r}")
    base = Path(root).expanduser()
    missing = [d for d in ("train", "val") if not (base / d).is_dir()]
    if missing:
        raise ConfigError(f"root: expected folders {base}/train and {base}/val with one sub-folder of images "
                          f"per class (missing: {', '.join(missing)})")
    train = ClassFolder(base / "train", None, transforms(image_size, augment, True, mean, std))
    evaluate = transforms(image_size, augment, False, mean, std)
    val = ClassFolder(base / "val", train.class_to_idx, evaluate)
    test = ClassFolder(base / "test", train.class_to_idx, evaluate) if (base / "test").is_dir() else None
    return DataSplits(train, val, test, num_classes=len(train.classes),
                      input_shape=(3, image_size, image_size),
                      meta={"classes": list(train.classes), "mean": tuple(mean), "std": tuple(std)})
