"""Checks and inputs for testing logit losses and divergences (for plugin authors).

The contract of ``docs/plugins.md`` as executable checks, so that a plugin's
tests need only its own mathematics (the reference implementation)::

    from kdcore.testing import check_divergence, check_logit_loss

    def test_my_loss_follows_the_contract():
        check_logit_loss(kdcore.create("loss", "my_loss"))

:func:`extreme_batches` is a hypothesis strategy (hypothesis is needed only
for it) of float32 inputs that break naive implementations.
:func:`value_and_grad` gives a loss's (or a reference's) value and student
gradient, for comparing the two.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from kdcore.functional import IGNORE_INDEX
from kdcore.losses import LogitLoss

__all__ = ["random_logits", "random_targets", "value_and_grad", "assert_finite_with_grads",
           "extreme_batches", "check_logit_loss", "check_divergence"]


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


def _value(loss, s, t, y) -> Tensor:
    with torch.no_grad():
        return loss(s, t, y).double()


def _close(a: Tensor, b: Tensor, what: str, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def check_logit_loss(loss, classes: int = 7, seed: int = 0) -> None:
    """Assert that ``loss`` follows the logit-loss call conventions (contract.md):

    - ``[N, C]`` and ``[B, T, C]`` inputs give the same value for the same rows;
    - positions with target -100 are ignored: the value equals the loss on the
      kept rows alone, and their gradients are exactly 0;
    - all positions ignored gives a finite value (0 for :class:`~kdcore.losses.LogitLoss`)
      and finite gradients;
    - bfloat16 inputs give about the float32 value, as a float32 result, and
      about the float32 student gradient, as a bfloat16 gradient;
    - chunked evaluation (``chunk_size``, where the loss has it) changes nothing:
      value, student and teacher gradients (teacher with and without ``requires_grad``),
      under a non-unit upstream gradient.

    A batch-level loss (``batch_level = True``, read with ``getattr`` so that
    any loss object may declare it; docs/plugins.md) couples the rows of a
    batch, so exactly one check does not apply and is skipped: chunked
    evaluation (it refuses ``chunk_size``). Every other check above runs for it
    too: token level vs flat, ignored rows dropped (the value on the kept rows
    alone), all ignored gives 0, bfloat16.
    """
    uses_teacher = getattr(loss, "uses_teacher", True)
    b, t = 3, 5
    zs = random_logits(b, t, classes, seed=seed)
    zt = random_logits(b, t, classes, seed=seed + 7) if uses_teacher else None
    y = random_targets(b, t, classes=classes, seed=seed, ignore_frac=0.3)
    y[0, 0], y[1, 1] = 1, IGNORE_INDEX  # at least one kept and one ignored position

    flat = (zs.reshape(-1, classes), None if zt is None else zt.reshape(-1, classes), y.reshape(-1))
    token = assert_finite_with_grads(loss, zs, zt, y)
    _close(token, _value(loss, *flat), "token-level [B, T, C] vs flat [N, C]")

    keep = flat[2] != IGNORE_INDEX
    kept = (flat[0][keep], None if zt is None else flat[1][keep], flat[2][keep])
    _close(token, _value(loss, *kept), "ignored positions must not change the value")

    none_kept = torch.full_like(y, IGNORE_INDEX)
    nothing = assert_finite_with_grads(loss, zs, zt, none_kept)
    if isinstance(loss, LogitLoss):
        assert nothing.item() == 0.0, f"all positions ignored should give 0, got {nothing}"

    s16, t16 = zs.bfloat16().requires_grad_(), None if zt is None else zt.bfloat16()
    bf = loss(s16, t16, y)
    assert bf.dtype == torch.float32, f"bfloat16 inputs should give a float32 loss, got {bf.dtype}"
    (bf_grad,) = torch.autograd.grad(bf, s16)
    assert bf_grad.dtype == torch.bfloat16, f"the student gradient should be bfloat16, got {bf_grad.dtype}"
    reference, grad = value_and_grad(loss, s16.detach().float(), None if t16 is None else t16.float(), y)
    _close(bf, reference, "bfloat16 inputs are computed in float32", rtol=1e-3, atol=1e-4)
    _close(bf_grad, grad, "bfloat16 inputs, student gradient", rtol=1e-2, atol=1e-3 * grad.abs().max().item())

    if hasattr(loss, "chunk_size") and not getattr(loss, "batch_level", False):
        plain, chunked = copy.deepcopy(loss), copy.deepcopy(loss)
        plain.chunk_size, chunked.chunk_size = None, 4
        for teacher_grad in (False, True):
            grads = []
            for fn in (plain, chunked):
                s = zs.clone().requires_grad_()
                t = None if zt is None else zt.clone().requires_grad_(teacher_grad)
                value = fn(s, t, y)
                (2.5 * value).backward()  # a non-unit upstream gradient reaches every chunk
                grads.append((value, s.grad, None if t is None else t.grad))
            (v1, gs1, gt1), (v2, gs2, gt2) = grads
            _close(v2, v1, "chunk_size=4 vs unchunked")
            _close(gs2, gs1, "chunk_size=4 vs unchunked, student gradient")
            if teacher_grad and zt is not None:
                assert (gt1 is None) == (gt2 is None), "chunking changes whether the teacher gets a gradient"
                if gt1 is not None:
                    _close(gt2, gt1, "chunk_size=4 vs unchunked, teacher gradient")


def check_divergence(div, classes: int = 6, seed: int = 0) -> None:
    """Assert that ``div(teacher_logp, student_logp)`` follows the divergence
    conventions: one finite value per row for ``[N, C]`` and ``[B, T, C]``
    inputs, 0 (to float32 precision) between identical distributions,
    non-negative, and finite with finite gradients where both distributions
    have ``-inf`` (zero-probability) columns."""
    p = torch.log_softmax(random_logits(4, classes, seed=seed), -1)
    q = torch.log_softmax(random_logits(4, classes, seed=seed + 1), -1)
    rows = div(p, q)
    assert rows.shape == (4,), f"a divergence reduces the last dim only: got shape {tuple(rows.shape)}"
    assert torch.isfinite(rows).all() and (rows >= -1e-6).all(), f"divergence values {rows}"
    same = div(p, p)
    assert same.abs().max() < 1e-5, f"D(p || p) should be 0, got {same}"
    p3, q3 = p.reshape(2, 2, classes), q.reshape(2, 2, classes)
    _close(div(p3, q3).reshape(-1), rows, "[B, T, C] vs [N, C]")

    z = random_logits(3, classes, seed=seed + 2)
    w = random_logits(3, classes, seed=seed + 3)
    z[:, -1] = w[:, -1] = float("-inf")
    zl, wl = z.clone().requires_grad_(), w.clone().requires_grad_()
    value = div(torch.log_softmax(zl, -1), torch.log_softmax(wl, -1)).sum()
    value.backward()
    assert torch.isfinite(value), f"divergence with a zero-probability column: {value}"
    assert torch.isfinite(zl.grad).all() and torch.isfinite(wl.grad).all(), "non-finite gradients"
