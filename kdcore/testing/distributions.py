"""Checks for divergences (functions of two log-probability distributions); transforms:
:mod:`kdcore.testing.transforms`."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kdcore.testing.inputs import close, random_logits
from kdcore.testing.skips import skipped


def check_divergence(div, classes: int = 6, seed: int = 0, skip: Iterable[str] = ()) -> None:
    """Assert that ``div(teacher_logp, student_logp)`` follows the divergence
    conventions. Sub-checks (names for ``testing_skips``):

    - ``per_row``: one finite value per row of ``[N, C]`` inputs;
    - ``zero_on_equal``: ``D(p || p) = 0`` to float32 precision;
    - ``non_negative``: no value below ``-1e-6``;
    - ``token_level``: ``[B, T, C]`` inputs give the values of the same rows flat;
    - ``zero_probability_columns``: finite values and gradients where both
      distributions have ``-inf`` (zero-probability) columns.
    """
    skip = skipped("divergence", div, skip)
    p = torch.log_softmax(random_logits(4, classes, seed=seed), -1)
    q = torch.log_softmax(random_logits(4, classes, seed=seed + 1), -1)
    rows = div(p, q)
    if "per_row" not in skip:
        assert rows.shape == (4,), f"a divergence reduces the last dim only: got shape {tuple(rows.shape)}"
        assert torch.isfinite(rows).all(), f"divergence values {rows}"
    if "non_negative" not in skip:
        assert (rows >= -1e-6).all(), f"negative divergence values {rows}"
    if "zero_on_equal" not in skip:
        same = div(p, p)
        assert same.abs().max() < 1e-5, f"D(p || p) should be 0, got {same}"
    if "token_level" not in skip:
        p3, q3 = p.reshape(2, 2, classes), q.reshape(2, 2, classes)
        close(div(p3, q3).reshape(-1), rows, "[B, T, C] vs [N, C]")
    if "zero_probability_columns" not in skip:
        z = random_logits(3, classes, seed=seed + 2)
        w = random_logits(3, classes, seed=seed + 3)
        z[:, -1] = w[:, -1] = float("-inf")
        zl, wl = z.clone().requires_grad_(), w.clone().requires_grad_()
        value = div(torch.log_softmax(zl, -1), torch.log_softmax(wl, -1)).sum()
        value.backward()
        assert torch.isfinite(value), f"divergence with a zero-probability column: {value}"
        assert torch.isfinite(zl.grad).all() and torch.isfinite(wl.grad).all(), "non-finite gradients"
