"""Reproducible inputs and small assertions shared by the checks of every kind."""

from __future__ import annotations

import torch
from torch import Tensor

from kdcore.losses.functional import IGNORE_INDEX


def random_logits(*shape: int, seed: int = 0, scale: float = 3.0) -> Tensor:
    """Float32 ``scale * N(0, 1)`` logits of ``shape``, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g)


def random_targets(*shape: int, classes: int, seed: int = 0, ignore_frac: float = 0.0) -> Tensor:
    """Class indices of ``shape`` with about ``ignore_frac`` of them set to -100."""
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, classes, shape, generator=g)
    return y.masked_fill(torch.rand(shape, generator=g) < ignore_frac, IGNORE_INDEX)


def value_and_grad(fn, student: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
    """``fn(student, *args, **kwargs)`` and its gradient with respect to
    ``student``, taken on a fresh leaf copy (``fn`` a loss or a reference)."""
    x = student.detach().clone().requires_grad_(True)
    value = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(value, x)
    return value, grad


def assert_finite_with_grads(loss, student: Tensor, teacher: Tensor | None, target: Tensor | None) -> Tensor:
    """The loss and its gradients (student, and teacher where given) are finite,
    and rows whose target is -100 get exactly zero gradient. Returns the value."""
    s = student.detach().clone().requires_grad_(True)
    t = None if teacher is None else teacher.detach().clone().requires_grad_(True)
    value = loss(s, t, target)
    assert value.dim() == 0, f"a logit loss returns a 0-dim tensor, got shape {tuple(value.shape)}"
    inputs = [x for x in (s, t) if x is not None]
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    assert torch.isfinite(value), f"loss value {value}"
    for name, g in zip(("student", "teacher"), grads):
        if g is None:
            continue
        assert torch.isfinite(g).all(), f"non-finite {name} gradient: {g}"
        if target is not None:
            ignored = target == IGNORE_INDEX
            assert torch.all(g[ignored] == 0), f"{name} gradient on ignored positions: {g[ignored]}"
    return value


def extreme_batches(max_rows: int = 5, min_classes: int = 3, max_classes: int = 9):
    """Hypothesis strategy of ``(student, teacher, target)`` float32 ``[N, C]`` batches:
    logits scaled up to 1e30, ``-inf`` padded columns shared by both models (at
    least two real classes), targets on real columns or -100, and, half the
    time, a teacher so confident that ``1 - p_t`` underflows."""
    import numpy as np
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays

    unit = st.floats(min_value=-1.0, max_value=1.0, width=32)
    scales = st.sampled_from([1.0, 30.0, 1e4, 1e8, 1e30])

    @st.composite
    def batches(draw):
        n = draw(st.integers(1, max_rows))
        c = draw(st.integers(min_classes, max_classes))
        zs = torch.from_numpy(draw(arrays(np.float32, (n, c), elements=unit)) * np.float32(draw(scales)))
        zt = torch.from_numpy(draw(arrays(np.float32, (n, c), elements=unit)) * np.float32(draw(scales)))
        real = draw(st.lists(st.integers(0, c - 1), min_size=2, max_size=c, unique=True))
        y = torch.tensor([draw(st.sampled_from(real + [IGNORE_INDEX])) for _ in range(n)])
        if draw(st.booleans()):
            gap = draw(st.sampled_from([50.0, 200.0, 1e4]))
            rows = (y != IGNORE_INDEX).nonzero().squeeze(-1)
            zt[rows, y[rows]] = zt.max() + gap
        padded = torch.ones(c, dtype=torch.bool)
        padded[real] = False
        zs[:, padded] = float("-inf")
        zt[:, padded] = float("-inf")
        return zs, zt, y

    return batches()


def close(a: Tensor, b: Tensor, what: str, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """``a`` and ``b`` agree in float64 to ``rtol`` / ``atol``; the message starts with ``what``."""
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
