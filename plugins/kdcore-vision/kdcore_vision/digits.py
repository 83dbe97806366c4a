"""Dataset ``digits``: a small real image dataset that needs no download.

The 1,797 8x8 grey-level handwritten digits (10 classes) of the UCI "Optical
Recognition of Handwritten Digits" set, as bundled with scikit-learn
(``sklearn.datasets.load_digits``), upsampled bilinearly to ``image_size`` pixels
and repeated over 3 channels so that every 32x32 CIFAR backbone runs on it
unchanged. Training images are augmented by small random shifts (zero-pad by 1/16
of the size, random crop); there is no flip -- digits are not mirror-symmetric.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from kdcore.common import params
from kdcore.common.errors import ConfigError
from kdcore.data import DataSplits
from kdcore_vision.image_split import ImageTensorSplit


def load_images(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images as ``uint8 [1797, 3, S, S]`` and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return x, torch.as_tensor(data.target, dtype=torch.long)


def digits(image_size: int = 32, split: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0,
           augment: bool = True) -> DataSplits:
    """Train / val / test splits of a seeded random permutation, ``split`` giving their fractions."""
    params.positive_int("image_size", image_size)
    if image_size < 8:
        raise ConfigError(f"image_size: must be >= 8, got {image_size}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed: must be an integer, got {seed!r}")
    if not isinstance(augment, bool):
        raise ConfigError(f"augment: must be true or false, got {augment!r}")
    numbers = all(not isinstance(s, bool) and isinstance(s, (int, float)) and s >= 0 for s in split)
    if len(split) != 3 or not numbers or abs(sum(split) - 1.0) > 1e-6:
        raise ConfigError(f"split: must be three non-negative fractions summing to 1, got {list(split)!r}")
    images, labels = load_images(image_size)
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(round(split[0] * n)), int(round(split[1] * n))
    if n_train == 0:
        raise ConfigError("split: the training split is empty")
    idx = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    train_x = images[idx[0]]
    mean = (train_x.float().mean() / 255.0).item()
    std = (train_x.float().std() / 255.0).item()
    norm = ([mean] * 3, [std] * 3)
    train = ImageTensorSplit(train_x, labels[idx[0]], *norm, augment=augment, pad=max(1, image_size // 16),
                             flip=False)
    val, test = (ImageTensorSplit(images[i], labels[i], *norm) if len(i) else None for i in idx[1:])
    return DataSplits(train, val, test, num_classes=10, input_shape=(3, image_size, image_size),
                      meta={"classes": [str(d) for d in range(10)], "mean": norm[0], "std": norm[1],
                            "source": "sklearn.datasets.load_digits"})
