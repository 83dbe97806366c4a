"""Checks for loss terms: logit losses (per-row and batch-level) and
``uses_outputs`` terms (feature losses called with :class:`kdcore.Outputs`)."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from kdcore.engine.taps import Tapping, check_taps, tap_paths
from kdcore.losses import LogitLoss
from kdcore.losses.functional import IGNORE_INDEX
from kdcore.losses.outputs import Outputs
from kdcore.testing.inputs import assert_finite_with_grads, close, random_logits, random_targets, value_and_grad
from kdcore.testing.models import TinyConvNet
from kdcore.testing.skips import skipped


def _value(loss, s, t, y) -> Tensor:
    with torch.no_grad():
        return loss(s, t, y).double()


def check_loss(loss, skip: Iterable[str] = (), **kwargs) -> None:
    """:func:`check_outputs_loss` for a term with ``uses_outputs = True``, else
    :func:`check_logit_loss` (keyword arguments go to the check)."""
    if getattr(loss, "uses_outputs", False):
        check_outputs_loss(loss, skip=skip, **kwargs)
    else:
        check_logit_loss(loss, skip=skip, **kwargs)


def check_logit_loss(loss, classes: int = 7, seed: int = 0, skip: Iterable[str] = ()) -> None:
    """Assert that ``loss(student_logits, teacher_logits, target)`` follows the
    logit-loss call conventions. Sub-checks (names for ``testing_skips``):

    - ``token_level``: ``[N, C]`` and ``[B, T, C]`` inputs give the same value
      for the same rows; the value is a finite 0-dim tensor with finite gradients;
    - ``ignored_rows``: positions with target -100 are ignored: the value equals
      the loss on the kept rows alone, and their gradients are exactly 0;
    - ``all_ignored``: all positions ignored gives a finite value (0 for a
      :class:`~kdcore.losses.LogitLoss`) and finite gradients;
    - ``bfloat16``: bfloat16 inputs give about the float32 value, as a float32
      result, and about the float32 student gradient, as a bfloat16 gradient;
    - ``chunking``: chunked evaluation (``chunk_size``, where the loss has it)
      changes nothing: value, student and teacher gradients (teacher with and
      without ``requires_grad``), under a non-unit upstream gradient;
    - ``outputs``: :class:`kdcore.Outputs` holding the logits give the same
      value as the logits tensors.

    A batch-level loss (``batch_level = True``, read with ``getattr`` so that
    any loss object may declare it) couples the rows of a batch, so
    ``chunking`` does not apply and is skipped; every other check runs for it.
    A loss with ``uses_teacher = False`` is called with teacher None.
    """
    skip = skipped("loss", loss, skip)
    uses_teacher = getattr(loss, "uses_teacher", True)
    b, t = 3, 5
    zs = random_logits(b, t, classes, seed=seed)
    zt = random_logits(b, t, classes, seed=seed + 7) if uses_teacher else None
    y = random_targets(b, t, classes=classes, seed=seed, ignore_frac=0.3)
    y[0, 0], y[1, 1] = 1, IGNORE_INDEX  # at least one kept and one ignored position

    flat = (zs.reshape(-1, classes), None if zt is None else zt.reshape(-1, classes), y.reshape(-1))
    if "token_level" not in skip:
        token = assert_finite_with_grads(loss, zs, zt, y)
        close(token, _value(loss, *flat), "token-level [B, T, C] vs flat [N, C]")

    if "ignored_rows" not in skip:
        token = assert_finite_with_grads(loss, zs, zt, y)
        keep = flat[2] != IGNORE_INDEX
        kept = (flat[0][keep], None if zt is None else flat[1][keep], flat[2][keep])
        close(token, _value(loss, *kept), "ignored positions must not change the value")

    if "all_ignored" not in skip:
        nothing = assert_finite_with_grads(loss, zs, zt, torch.full_like(y, IGNORE_INDEX))
        if isinstance(loss, LogitLoss):
            assert nothing.item() == 0.0, f"all positions ignored should give 0, got {nothing}"

    if "bfloat16" not in skip:
        s16, t16 = zs.bfloat16().requires_grad_(), None if zt is None else zt.bfloat16()
        bf = loss(s16, t16, y)
        assert bf.dtype == torch.float32, f"bfloat16 inputs should give a float32 loss, got {bf.dtype}"
        (bf_grad,) = torch.autograd.grad(bf, s16)
        assert bf_grad.dtype == torch.bfloat16, f"the student gradient should be bfloat16, got {bf_grad.dtype}"
        reference, grad = value_and_grad(loss, s16.detach().float(), None if t16 is None else t16.float(), y)
        close(bf, reference, "bfloat16 inputs are computed in float32", rtol=1e-3, atol=1e-4)
        close(bf_grad, grad, "bfloat16 inputs, student gradient", rtol=1e-2,
              atol=1e-3 * grad.abs().max().item())

    if "chunking" not in skip and hasattr(loss, "chunk_size") and not getattr(loss, "batch_level", False):
        _check_chunking(loss, zs, zt, y)

    if "outputs" not in skip:
        via_outputs = _value(loss, Outputs(zs), None if zt is None else Outputs(zt), y)
        close(via_outputs, _value(loss, zs, zt, y), "kdcore.Outputs(logits) vs the logits tensors")


def _check_chunking(loss, zs: Tensor, zt: Tensor | None, y: Tensor) -> None:
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
        close(v2, v1, "chunk_size=4 vs unchunked")
        close(gs2, gs1, "chunk_size=4 vs unchunked, student gradient")
        if teacher_grad and zt is not None:
            if gt1 is not None or gt2 is not None:  # no gradient (None) and a zero gradient are the same
                gt1, gt2 = (torch.zeros_like(zt) if g is None else g for g in (gt1, gt2))
                close(gt2, gt1, "chunk_size=4 vs unchunked, teacher gradient")


def _outputs(model: nn.Module, paths: tuple[str, ...], x: Tensor) -> Outputs:
    tapping = Tapping(model, paths)
    with tapping as features:
        logits = model(x)
    out = Outputs.of(logits)
    return Outputs(out.logits, features=features, index=torch.arange(x.shape[0]))


def check_outputs_loss(loss, student: nn.Module | None = None, teacher: nn.Module | None = None,
                       inputs: Tensor | None = None, classes: int = 5, skip: Iterable[str] = ()) -> None:
    """Assert that a ``uses_outputs`` term works as the engine calls it:
    ``loss(student_outputs, teacher_outputs, target)`` with :class:`kdcore.Outputs`
    whose ``features`` hold the modules named in ``student_taps`` / ``teacher_taps``
    (after ``loss.bind(student, teacher)`` where the loss has ``bind``), and
    ``index`` the batch's sample indices. The models default to two
    :class:`~kdcore.testing.models.TinyConvNet` of different widths on
    ``4 x 3 x 8 x 8`` inputs (``inputs``). As in the engine, a first call
    without gradients lets lazy connectors take their shapes. Sub-checks:

    - ``taps``: the tap paths are modules of the models;
    - ``value``: a finite 0-dim tensor;
    - ``gradients``: finite gradients on the student's (and the loss's own)
      parameters, not all zero;
    - ``teacher_detached``: no gradient reaches the teacher's parameters;
    - ``float64``: float64 models and inputs give a finite float64 value from a
      copy of the term taken before its first call, with its initialised
      parameters and buffers cast to float64 and its lazy ones not: connectors
      created on the first call follow the features' dtype (a term cast whole
      with ``.double()`` before its first call would hide a connector that does not).
    """
    skip = skipped("outputs_loss", loss, skip)
    assert isinstance(loss, nn.Module), "a uses_outputs term is a torch.nn.Module (the engine moves and saves it)"
    uses_teacher = getattr(loss, "uses_teacher", True)
    student = TinyConvNet(classes, width=4, seed=0) if student is None else student
    if uses_teacher and teacher is None:
        teacher = TinyConvNet(classes, width=6, seed=1)
    teacher = teacher if uses_teacher else None
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2)) if inputs is None else inputs
    y = torch.randint(0, classes, (x.shape[0],), generator=torch.Generator().manual_seed(3))
    if callable(getattr(loss, "bind", None)):
        loss.bind(student, teacher)
    fresh = None if "float64" in skip else copy.deepcopy(loss)
    s_paths = tap_paths(getattr(loss, "student_taps", ()))
    t_paths = tap_paths(getattr(loss, "teacher_taps", ())) if uses_teacher else ()
    if "taps" not in skip:
        check_taps(student, s_paths, type(loss).__name__, "student")
        if teacher is not None:
            check_taps(teacher, t_paths, type(loss).__name__, "teacher")

    def call(term, s_model, t_model, inp):
        s_out = _outputs(s_model, s_paths, inp)
        with torch.no_grad():
            t_out = None if t_model is None else _outputs(t_model, t_paths, inp)
        return term(s_out, t_out, y)

    with torch.no_grad():
        call(loss, student, teacher, x)  # lazy connectors take their shapes, as in the engine's first pass
    value = call(loss, student, teacher, x)
    if "value" not in skip:
        assert isinstance(value, Tensor) and value.dim() == 0, f"a loss returns a 0-dim tensor, got {value!r}"
        assert torch.isfinite(value), f"loss value {value}"
    if "gradients" in skip and "teacher_detached" in skip:
        return
    value.backward()
    if "gradients" not in skip:
        grads = [p.grad for p in [*student.parameters(), *loss.parameters()] if p.grad is not None]
        assert grads, "no gradient reaches the student's parameters"
        assert all(torch.isfinite(g).all() for g in grads), "non-finite gradients"
        assert any(g.abs().sum() > 0 for g in grads), "every gradient is zero"
    if "teacher_detached" not in skip and teacher is not None:
        leaked = [n for n, p in teacher.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert not leaked, f"gradients reach the teacher: {leaked}"
    if "float64" not in skip:
        s64, t64 = copy.deepcopy(student).double(), None if teacher is None else copy.deepcopy(teacher).double()
        _initialised_to_float64(fresh)
        try:
            with torch.no_grad():
                v64 = call(fresh, s64, t64, x.double())
        except RuntimeError as exc:
            raise AssertionError(f"float64 features, the term's lazy connectors not cast: {exc}") from exc
        assert v64.dtype == torch.float64 and torch.isfinite(v64), f"float64 inputs give {v64!r}"
        other = [n for n, p in fresh.named_parameters() if p.dtype != torch.float64]
        assert not other, f"parameters created for float64 features are not float64: {other}"


def _initialised_to_float64(module: nn.Module) -> None:
    """Cast ``module``'s initialised floating parameters and buffers to float64 in place,
    leaving uninitialised (lazy) ones as they are, so that these must follow the features."""
    lazy = (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)
    for t in [*module.parameters(), *module.buffers()]:
        if not isinstance(t, lazy) and t.is_floating_point():
            t.data = t.data.double()
