"""Built-in dataset ``gaussian_mixture`` (PTLoss paper appendix A.5, after Ren et al. 2022).

Labels are uniform over ``num_classes``; ``x | y=k ~ N(mu_k, sigma^2 I)`` with
``mu_k`` entries drawn from {-1, 0, 1}. With a uniform prior the exact Bayes
posterior is ``p*(y=k|x) = softmax_k((x . mu_k - |mu_k|^2 / 2) / sigma^2)``;
every split carries it as ``posterior``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kdcore.common import params
from kdcore.common.errors import ConfigError
from kdcore.data import DataSplits, TensorSplit
from kdcore.losses.functional import IGNORE_INDEX


def bayes_posterior(x: torch.Tensor, means: torch.Tensor, sigma: float) -> torch.Tensor:
    """Exact ``p*(y|x)`` of an isotropic Gaussian mixture with a uniform prior."""
    x64, mu = x.double(), means.double()
    logits = (x64 @ mu.T - 0.5 * (mu * mu).sum(-1)) / sigma ** 2
    return torch.softmax(logits, dim=-1).float()


def _check_size(n: int, dim: int, num_classes: int) -> None:
    """Refuse sizes whose samples would not fit in memory, naming the largest of them.

    The peak is about ``n * (8 + 12 * dim + 36 * num_classes)`` bytes: the int64
    labels, three float32 ``n x dim`` tensors while ``x`` is drawn, and the float64
    ``n x num_classes`` logits of the posterior."""
    sizes = {"n": n, "dim": dim, "num_classes": num_classes}
    key = max(sizes, key=sizes.get)
    params.fits_in_memory(key, sizes[key], n * (8 + 12 * dim + 36 * num_classes))


def gaussian_mixture(num_classes: int = 3, dim: int = 30, sigma: float = 2.0, n: int = 10000,
                     split: Sequence[float] = (0.9, 0.05, 0.05), seed: int = 0,
                     train_size: int | None = None, unlabelled: int = 0) -> DataSplits:
    """Generate the mixture deterministically from ``seed`` (CPU generator).

    ``train_size`` keeps only the first ``train_size`` samples of the training
    split (a small labelled set; validation and test splits unchanged).
    ``unlabelled`` marks the last ``unlabelled`` of the kept training samples
    unlabelled (target -100, posterior kept): a transfer set, which a loss term
    with ``rows = "all"`` distils on while ``ce`` ignores it."""
    params.positive_int("train_size", train_size, optional=True)
    if isinstance(unlabelled, bool) or not isinstance(unlabelled, int) or unlabelled < 0:
        raise ConfigError(f"unlabelled: must be a non-negative integer, got {unlabelled!r}")
    params.positive_int("num_classes", num_classes)
    params.positive_int("dim", dim)
    params.positive_int("n", n)
    sigma = params.positive("sigma", sigma)
    _check_size(n, dim, num_classes)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed: must be an integer, got {seed!r}")
    if not isinstance(split, Sequence) or isinstance(split, str) or len(split) != 3 \
            or any(isinstance(s, bool) or not isinstance(s, (int, float)) or s < 0 for s in split) \
            or abs(sum(split) - 1.0) > 1e-6:
        raise ConfigError(f"split: must be three non-negative fractions summing to 1, got {split!r}")
    g = torch.Generator().manual_seed(seed)
    means = torch.randint(-1, 2, (num_classes, dim), generator=g).float()
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = means[y] + sigma * torch.randn(n, dim, generator=g)
    post = bayes_posterior(x, means, sigma)
    n_train = int(round(split[0] * n))
    n_val = int(round(split[1] * n))
    cuts = [(0, n_train), (n_train, n_train + n_val), (n_train + n_val, n)]
    parts = [TensorSplit(x[a:b], y[a:b], post[a:b]) if b > a else None for a, b in cuts]
    if parts[0] is None:
        raise ConfigError("split: the training split is empty")
    if train_size is not None:
        if train_size > len(parts[0]):
            raise ConfigError(f"train_size: {train_size} is more than the {len(parts[0])} training samples")
        train = parts[0]
        parts[0] = TensorSplit(train.inputs[:train_size], train.targets[:train_size], train.posterior[:train_size])
    if unlabelled:
        train = parts[0]
        if unlabelled >= len(train):
            raise ConfigError(f"unlabelled: {unlabelled} leaves none of the {len(train)} training samples labelled")
        targets = train.targets.clone()
        targets[len(train) - unlabelled:] = IGNORE_INDEX
        parts[0] = TensorSplit(train.inputs, targets, train.posterior)
    return DataSplits(*parts, num_classes=num_classes, input_shape=(dim,),
                      meta={"means": means, "sigma": sigma})
