"""An in-memory image split with cheap tensor augmentation (CIFAR-style pad + crop + flip).

Images are held as one ``uint8`` tensor ``[n, C, H, W]``, stored already zero-padded
by ``pad`` pixels when the split augments, so a random crop is a slice; samples are
returned as normalised ``float32`` ``[C, H, W]`` tensors and ``int64`` labels.
Randomness comes from torch's global generator (per worker in a DataLoader), so a
seeded run is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F


class ImageTensorSplit(torch.utils.data.Dataset):
    """``(image, label)`` pairs from ``images`` ``uint8 [n, C, H, W]`` and ``labels`` ``[n]``.

    With ``augment=True`` every access takes a random ``H x W`` crop of the image
    zero-padded by ``pad`` pixels and, if ``flip``, mirrors it horizontally with
    probability 1/2 (He et al. 2016, sec. 4.2). ``mean`` / ``std`` (per channel, on the
    [0, 1] scale) normalise the result.
    """

    def __init__(self, images: Tensor, labels: Tensor, mean: Sequence[float], std: Sequence[float],
                 augment: bool = False, pad: int = 4, flip: bool = True):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 tensor [n, C, H, W]")
        if labels.shape != images.shape[:1]:
            raise ValueError("labels must have one entry per image")
        self.height, self.width = images.shape[-2:]
        self.augment, self.pad, self.flip = augment, (pad if augment else 0), flip
        self.images = F.pad(images, [self.pad] * 4) if self.pad else images.contiguous()
        self.labels = labels.long()
        std_t = torch.tensor(std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std_t)).view(-1, 1, 1)
        self.shift = (torch.tensor(mean, dtype=torch.float32) / std_t).view(-1, 1, 1)

    @property
    def random_views(self) -> bool:
        """Whether reading an image twice may give different crops (kdcore refuses a teacher
        store or cache keyed by sample index on such a split unless ``teacher.fixed_view``)."""
        return bool(self.pad) or (self.augment and self.flip)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img = self.images[i]
        if self.pad:
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            img = img[:, dy:dy + self.height, dx:dx + self.width]
        if self.augment and self.flip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img.float() * self.scale - self.shift, self.labels[i]
