"""Checks for transforms of every side (docs/methods/transforms.md): the transform
alone, and the transform inside a loss term's chain."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from kdcore.losses import LogitLoss
from kdcore.losses.base import SIDES
from kdcore.testing.inputs import assert_finite_with_grads, close, random_logits, random_targets
from kdcore.testing.skips import skipped

#: the magnitudes of the extreme float32 logits (``extreme_inputs``)
EXTREME_SCALES = (1e4, 1e30, 1e38)


class _Probe(LogitLoss):
    """A per-row loss that exposes both sides as the chain leaves them: the
    probabilities ``softmax`` of each weighted by fixed random numbers (bounded, so
    any non-finite value comes from the transform), every column getting a gradient."""

    def __init__(self, transform, classes: int):
        super().__init__(transforms=[transform])
        self.weights = random_logits(2, classes, seed=99, scale=1.0)

    def rows(self, student: Tensor, teacher: Tensor, target: Tensor | None) -> Tensor:
        w = self.weights.to(student.dtype)
        return (torch.softmax(student, -1) * w[0] + torch.softmax(teacher, -1) * w[1]).sum(-1)


def _side(transform) -> str:
    """``"pair"`` for a transform with ``pair``, else its ``side`` (default ``"teacher"``)."""
    return "pair" if callable(getattr(transform, "pair", None)) else getattr(transform, "side", "teacher")


def _apply(transform, teacher: Tensor, student: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
    """Both sides through ``transform`` alone (a side it does not act on is returned as given)."""
    side = _side(transform)
    if side == "pair":
        out = transform.pair(teacher, student, target)
        return out[0], out[1]
    return (teacher if side == "student" else transform(teacher, target),
            student if side == "teacher" else transform(student, target))


def _padded_logp(shape: tuple[int, ...], classes: int, seed: int, scale: float = 3.0) -> tuple[Tensor, Tensor]:
    """``(logits, log_softmax(logits))`` of ``shape + (classes,)`` with a ``-inf`` (padding) last column."""
    z = random_logits(*shape, classes, seed=seed, scale=scale)
    z[..., -1] = float("-inf")
    return z, torch.log_softmax(z, -1)


def check_transform(transform, classes: int = 6, seed: int = 0, skip: Iterable[str] = ()) -> None:
    """Assert that ``transform`` follows the transform conventions on the side(s) it
    declares (``side``: "teacher", default, "student" or "both"; or ``pair``). The
    inputs are log-probabilities with a ``-inf`` (padding) last column; targets are
    real classes. Sub-checks (names for ``testing_skips``):

    - ``shape``: each output has its input's shape and dtype;
    - ``normalised``: ``exp(out)`` sums to 1 over the last dim, no NaN;
    - ``padding_kept``: the ``-inf`` column stays ``-inf`` and no other column becomes ``-inf``;
    - ``token_level``: ``[B, T, C]`` inputs give the rows of the flat ``[N, C]`` call;
    - ``finite_gradients``: gradients through the transform are finite;
    - ``extreme_inputs``: in a loss term's chain, finite values and gradients
      (student, teacher, the transform's own parameters) for float32 logits of
      magnitude up to 1e38, the two models apart or equal;
    - ``in_loss``: in a loss term's chain, ``[B, T, C]`` inputs with ``-100``
      positions give the value of the kept rows alone, chunked (``chunk_size``) or
      not, and the ignored rows get zero gradient;
    - ``one_side``: a transform on one side leaves the other side's logits as
      they are;
    - ``shift_invariant``: for a transform that declares ``shift_invariant = True``,
      adding a per-row constant to its input changes nothing.
    """
    skip = skipped("transform", transform, skip)
    side = _side(transform)
    assert side in (*SIDES, "pair"), f"side must be one of {SIDES}, got {side!r}"
    z, logp = _padded_logp((2, 3), classes, seed)
    _, logq = _padded_logp((2, 3), classes, seed + 1)
    y = random_targets(2, 3, classes=classes - 1, seed=seed)
    outs = _apply(transform, logp, logq, y)
    ins = (logp, logq)
    for name, out, x in zip(("teacher", "student"), outs, ins):
        if "shape" not in skip:
            assert out.shape == x.shape, f"{name}: output shape {tuple(out.shape)} for input {tuple(x.shape)}"
            assert out.dtype == x.dtype, f"{name}: output dtype {out.dtype} for input {x.dtype}"
        if "normalised" not in skip:
            assert not torch.isnan(out).any(), f"{name}: NaN in the transformed log-probabilities"
            close(out.exp().sum(-1), torch.ones(2, 3), f"{name}: exp(transform(logp)) must sum to 1")
        if "padding_kept" not in skip:
            assert torch.isneginf(out[..., -1]).all(), \
                f"{name}: a -inf (padding) column must stay -inf, got {out[..., -1]}"
            assert torch.isfinite(out[..., :-1]).all(), f"{name}: a real class became -inf or non-finite"
    if "token_level" not in skip:
        flat = _apply(transform, logp.reshape(-1, classes), logq.reshape(-1, classes), y.reshape(-1))
        for name, out, f in zip(("teacher", "student"), outs, flat):
            close(out.reshape(-1, classes)[:, :-1], f[:, :-1], f"{name}: [B, T, C] vs [N, C]")
    if "finite_gradients" not in skip:
        _check_finite_gradients(transform, z, classes, y, seed)
    if "shift_invariant" not in skip and getattr(transform, "shift_invariant", False):
        shift = random_logits(2, 3, 1, seed=seed + 5, scale=50.0)
        for name, a, b in zip(("teacher", "student"), _apply(transform, logp + shift, logq + shift, y), outs):
            close(a[..., :-1], b[..., :-1], f"{name}: shift invariance")
    if "one_side" not in skip and side in ("teacher", "student"):
        _check_one_side(transform, side, classes, seed)
    if "in_loss" not in skip:
        _check_in_loss(transform, classes, seed)
    if "extreme_inputs" not in skip:
        _check_extreme(transform, classes, seed)


def _check_finite_gradients(transform, z: Tensor, classes: int, y: Tensor, seed: int) -> None:
    """Gradients through the transform alone are finite (nothing to check where it detaches)."""
    zl = z.clone().requires_grad_()
    zq = random_logits(2, 3, classes, seed=seed + 1).requires_grad_()
    outs = _apply(transform, torch.log_softmax(zl, -1), torch.log_softmax(zq, -1), y)
    total = sum(o[..., :-1].sum() for o in outs)
    if total.requires_grad:
        total.backward()
        for name, g in (("teacher", zl.grad), ("student", zq.grad)):
            assert g is None or torch.isfinite(g).all(), f"{name}: non-finite gradients through the transform"


def _check_one_side(transform, side: str, classes: int, seed: int) -> None:
    """The side a one-sided transform does not act on reaches the loss unchanged."""
    probe = _Probe(transform, classes)
    s = random_logits(4, classes, seed=seed + 2)
    t = random_logits(4, classes, seed=seed + 3)
    s_out, t_out, _ = probe.sides(s, t, None)
    if side == "teacher":
        assert torch.equal(s_out, s), "a teacher-side transform changed the student's logits"
    else:
        assert torch.equal(t_out, t), "a student-side transform changed the teacher's logits"


def _check_in_loss(transform, classes: int, seed: int) -> None:
    """``[B, T, C]`` with -100 rows equals the kept rows flat, chunked or not; ignored rows
    get zero gradient and their values do not matter."""
    zs, _ = _padded_logp((2, 4), classes, seed + 4)
    zt, _ = _padded_logp((2, 4), classes, seed + 5)
    y = random_targets(2, 4, classes=classes - 1, seed=seed + 6, ignore_frac=0.4)
    y[0, 0], y[1, -1] = 0, -100
    keep = y != -100
    whole = _Probe(transform, classes)
    ref = assert_finite_with_grads(whole, zs, zt, y)
    close(whole(zs[keep], zt[keep], y[keep]), ref, "[B, T, C] with -100 vs the kept rows")
    garbage_s, garbage_t = zs.clone(), zt.clone()
    garbage_s[~keep] = 1e30
    garbage_t[~keep] = -1e30
    close(whole(garbage_s, garbage_t, y), ref, "the values of ignored rows changed the loss")
    chunked = _Probe(transform, classes)
    chunked.chunk_size = 3
    close(assert_finite_with_grads(chunked, zs, zt, y), ref, "chunk_size=3 vs unchunked")


def _check_extreme(transform, classes: int, seed: int) -> None:
    """Finite values and gradients in the chain (the logits', and the transform's own
    parameters') for float32 logits up to 1e38 in magnitude, the two models apart or equal."""
    probe = _Probe(transform, classes)
    y = torch.tensor([0, 1, -100])
    for i, scale in enumerate(EXTREME_SCALES):
        unit = random_logits(3, classes, seed=seed + 10 + i, scale=1.0).clamp(-1, 1)
        zs = unit * scale
        zs[:, -1] = float("-inf")
        for zt in (zs.flip(0), zs.clone()):
            assert_finite_with_grads(probe, zs, zt, y)
            own = probe.trained_parameters()
            if own:
                grads = torch.autograd.grad(probe(zs, zt, y), own, allow_unused=True)
                assert all(g is None or torch.isfinite(g).all() for g in grads), \
                    f"non-finite gradients of the transform's parameters at logits of magnitude {scale:g}"
