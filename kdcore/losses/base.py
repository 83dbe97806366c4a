"""The logit-loss contract and its shared machinery.

A logit loss is called ``loss(student_logits, teacher_logits, target)`` with
``[N, C]`` logits and ``[N]`` targets, or ``[B, T, C]`` and ``[B, T]`` (token
level); positions whose target is ``-100`` are ignored and the result is the
mean over kept positions. Subclasses of :class:`LogitLoss` only write
:meth:`LogitLoss.rows`, the per-row value on float32 rows; this class does the
flattening, masking, dtype handling, teacher transforms and the optional
chunked evaluation (``chunk_size``) that bounds memory on large vocabularies.
Every logit loss also takes :class:`kdcore.Outputs` for either model (docs/outputs.md,
"Model outputs"): with ``chunk_size`` and ``hidden`` / ``head`` but no logits it
projects chunk by chunk (:mod:`kdcore.losses.fused`, docs/fused.md).

A loss whose value couples the rows of a batch sets ``batch_level = True`` and
writes :meth:`LogitLoss.batch_value` instead (docs/plugins.md, "Batch-level
losses"): it gets the kept rows of the whole (local) batch at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdcore.common import params
from kdcore.common.errors import ConfigError
from kdcore.losses.functional import IGNORE_INDEX, flatten_rows, upcast
from kdcore.losses.fused import kept_rows, fused_kept_sum
from kdcore.losses.outputs import Outputs
from kdcore.plugins.registry import Spec, build


def resolve_divergence(spec: Spec | None, path: str = "divergence", default: str = "kl") -> Any:
    """A divergence from a registered name, a ``{"name": ..., **params}`` mapping or an object,
    built with :func:`build` at key ``path`` (``default`` where ``spec`` is None)."""
    return build("divergence", default if spec is None else spec, path)


def resolve_transforms(specs: Sequence[Spec] | None, path: str = "transforms") -> list[Any]:
    """A chain of teacher transforms (each a name, a mapping or an object), built with
    :func:`build` at keys ``path[0]``, ``path[1]``, ..."""
    if specs is None:
        return []
    if isinstance(specs, (str, Mapping)) or callable(specs):
        specs = [specs]
    return [build("transform", s, f"{path}[{i}]") for i, s in enumerate(specs)]


def _logits(x):
    return x.logits if isinstance(x, Outputs) else x


def _pair(x) -> tuple[Tensor, object]:
    """``(hidden, head)`` of projectable outputs without logits, else ``(logits, None)``."""
    if isinstance(x, Outputs):
        return (x.hidden, x.head) if x.projectable and not x.has_logits else (x.logits, None)
    return x, None


def _kept_logits(x, keep: Tensor | None) -> Tensor | None:
    """The logits rows ``[n, C]`` of ``x`` (a tensor, :class:`Outputs` or None) at the
    kept positions; projectable outputs without logits project only those rows."""
    if x is None:
        return None
    rows, head = _pair(x)
    rows = kept_rows(rows, keep)
    return rows if head is None else head(rows)


#: the sides a transform may declare (``side``); absent: the teacher
SIDES = ("teacher", "student", "both")


def _transform_side(transform: Any, path: str) -> str:
    """``"pair"`` for a transform with a ``pair`` method, else its ``side``
    (``"teacher"`` when it declares none); any other value is a ConfigError."""
    if callable(getattr(transform, "pair", None)):
        return "pair"
    side = getattr(transform, "side", "teacher")
    if side not in SIDES:
        raise ConfigError(f"{path}: a transform's side must be one of {', '.join(map(repr, SIDES))}, "
                          f"got {side!r} from {transform!r}")
    return side


def _scaled(values: Tensor, scale: Tensor | None) -> Tensor:
    """Per-row ``values`` ``[n]`` times a transform chain's scale (0-dim or ``[n]``; None: 1)."""
    return values if scale is None else values * scale


class LogitLoss(nn.Module):
    """Base class of logit losses (see the module docstring).

    Parameters common to every logit loss:

    - ``temperature``: T, the softening temperature (docs/conventions.md);
    - ``transforms``: a chain of transforms, each applied to the side(s) it
      declares (``side``: "teacher", the default, "student" or "both"; a
      transform with ``pair`` sees both at once) on log-probabilities at T=1,
      before the loss's own temperature (``log_softmax(x / T)`` is the softened
      transformed side); transforms that are modules are submodules of the
      loss (trained and checkpointed with it), see :meth:`sides`;
    - ``chunk_size``: evaluate rows in chunks of this many, computing the
      input gradients chunk by chunk (bounded memory for large vocabularies;
      with :class:`kdcore.Outputs` inputs the fused vocabulary projection,
      docs/fused.md).

    A per-row loss implements :meth:`rows` (or :meth:`kept_sum`); a
    batch-level loss (``batch_level = True``) implements :meth:`batch_value`.
    """

    #: whether the loss needs teacher logits (False: a supervised term such as ce)
    uses_teacher: bool = True
    #: whether the loss needs the labels
    uses_target: bool = False
    #: whether the value couples the rows of a batch: then the loss implements
    #: :meth:`batch_value` instead of :meth:`rows` and refuses ``chunk_size``
    #: (docs/plugins.md, "Batch-level losses")
    batch_level: bool = False

    def __init__(self, *, temperature: float = 1.0, transforms: Sequence[Spec] | None = None,
                 chunk_size: int | None = None):
        super().__init__()
        self.temperature = params.positive("temperature", temperature)
        self.transforms = resolve_transforms(transforms)
        self._transform_sides = [_transform_side(t, f"transforms[{i}]") for i, t in enumerate(self.transforms)]
        self._check_teacherless_sides()
        modules = {str(i): t for i, t in enumerate(self.transforms) if isinstance(t, nn.Module)}
        if modules:  # submodules by chain position: trained and checkpointed with the loss
            self.transform_modules = nn.ModuleDict(modules)
        self.chunk_size = params.positive_int("chunk_size", chunk_size, optional=True)
        if self.batch_level and self.chunk_size is not None:
            raise ConfigError(f"chunk_size: {type(self).__name__} is a batch-level loss (its value couples "
                              "the rows of a batch), so it cannot be evaluated in chunks")

    def _check_teacherless_sides(self) -> None:
        """A loss without a teacher (``uses_teacher = False``, e.g. ``ce``) takes only
        transforms that act on the student: a teacher-side or pair transform would
        have nothing to act on."""
        if self.uses_teacher:
            return
        for i, side in enumerate(self._transform_sides):
            if side in ("teacher", "pair"):
                raise ConfigError(f"transforms[{i}]: {type(self).__name__} does not use the teacher, so this "
                                  f"{'teacher-side' if side == 'teacher' else 'two-sided'} transform has nothing "
                                  "to act on; give it a student-side transform, or none")

    def rows(self, student: Tensor, teacher: Tensor | None, target: Tensor | None) -> Tensor:
        """Per-row loss ``[n]`` from float32 (or float64) rows ``[n, C]``.

        ``student`` and ``teacher`` are the logits, or, when transforms are set,
        the sides as :meth:`sides` returns them (log-probabilities or values
        used as logits). ``target``
        has ignored rows replaced by class 0 (their values are discarded); it
        is None for losses whose ``uses_target`` is False.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement rows()")

    def batch_value(self, student: Tensor, teacher: Tensor | None, target: Tensor | None) -> Tensor:
        """The loss of a batch-level loss (``batch_level = True``): a 0-dim tensor.

        Inputs: ``student`` and ``teacher`` are ``[n, C]`` rows, float32 or
        float64 (bf16/fp16 upcast), flattened from ``[B, T, C]`` where the input
        was token level, with the ignored rows (target -100) already removed and
        both sides already through :meth:`sides`; ``target`` is ``[n]``
        with no -100 (None when ``uses_target`` is False, or when the call had no
        target, then all rows are kept). ``n >= 1``: a batch with no kept row is
        0 without calling this. The return value is the loss itself (the base
        class divides by nothing, and multiplies it by a transform's 0-dim
        scale where one gives it). Under DDP the loss sees the local batch of
        each rank only.
        """
        raise NotImplementedError(f"{type(self).__name__} is batch-level and must implement batch_value()")

    def sides(self, student: Tensor, teacher: Tensor | None,
              target: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(student, teacher, scale)`` as the loss sees them.

        Without transforms: the logits unchanged and no scale (None). Else each
        side the chain touches starts as ``log_softmax`` of its logits (T = 1; a
        side no transform touches stays logits) and goes through the chain in
        order: a transform with ``pair`` maps both at once, ``pair(teacher,
        student, target) -> (teacher, student[, scale])``; any other is called
        ``transform(x, target)`` on each side its ``side`` names. The scales
        multiply (0-dim, or ``[n]`` per row) and multiply the loss's per-row
        values. ``target`` is handed on as the loss received it (-100 at ignored
        rows for per-row losses, which discard those rows' values; ignored rows
        removed for batch-level ones). A side that is None (no teacher) stays None.
        """
        if not self.transforms:
            return student, teacher, None
        touched = set(self._transform_sides)
        if touched & {"student", "both", "pair"}:
            student = torch.log_softmax(student, dim=-1)
        if teacher is not None and touched & {"teacher", "both", "pair"}:
            teacher = torch.log_softmax(teacher, dim=-1)
        scale = None
        for transform, side in zip(self.transforms, self._transform_sides):
            if side == "pair":
                if teacher is None:
                    raise ValueError(f"{type(self).__name__}: transform {transform!r} needs the teacher")
                out = transform.pair(teacher, student, target)
                teacher, student = out[0], out[1]
                if len(out) > 2:
                    scale = out[2] if scale is None else scale * out[2]
                continue
            if side != "student" and teacher is not None:
                teacher = transform(teacher, target)
            if side != "teacher":
                student = transform(student, target)
        return student, teacher, scale

    def lean_kd_temperature(self) -> float | None:
        """T where this loss is exactly ``T^2 KL(softmax(teacher / T) || softmax(student / T))``
        per row on the teacher's logits as given (no transforms), else None (the
        default). The fused path then evaluates a frozen teacher's chunks with
        :func:`kdcore.losses.fused.kd_chunk`, which keeps fewer chunk-sized buffers."""
        return None

    def kept_sum(self, student: Tensor, teacher: Tensor | None, target: Tensor | None) -> Tensor:
        """Sum of :meth:`rows` over the kept rows (all rows when ``target`` is None).

        Inputs are flattened but not yet upcast. A subclass with a fused kernel
        for the whole sum (``ce`` uses ``F.cross_entropy(..., ignore_index=-100,
        reduction="sum")``) may override this instead of :meth:`rows`.
        """
        s, t, scale = self.sides(upcast(student), None if teacher is None else upcast(teacher), target)
        if target is None:
            return _scaled(self.rows(s, t, None), scale).sum()
        keep = target != IGNORE_INDEX
        values = self.rows(s, t, torch.where(keep, target, 0) if self.uses_target else None)
        return torch.where(keep, _scaled(values, scale), 0.0).sum()

    def forward(self, student: Tensor | Outputs, teacher: Tensor | Outputs | None = None,
                target: Tensor | None = None) -> Tensor:
        if isinstance(student, Outputs) or isinstance(teacher, Outputs):
            return self._forward_outputs(student, teacher, target)
        self._check_inputs(teacher, target)
        s, t, y = flatten_rows(student, teacher if self.uses_teacher else None, target)
        if self.batch_level:
            keep = None if y is None else y != IGNORE_INDEX
            return self._batch(kept_rows(s, keep), _kept_logits(t, keep), None if y is None else y[keep])
        kept = s.shape[0] if y is None else None  # the kept rows, where known on the host
        if y is not None and y.device.type == "cpu":  # counting them costs no device sync here
            kept = int((y != IGNORE_INDEX).sum())
            if kept == y.shape[0] and not self.uses_target and not self.transforms:
                y = None  # every row is kept and nothing reads the labels: the sum needs no mask
        if self.chunk_size is None or s.shape[0] <= self.chunk_size:
            total = self.kept_sum(s, t, y)
        else:
            total, _ = fused_kept_sum(self.kept_sum, self.chunk_size, (s, None),
                                      None if t is None else (t, None), y, params=self.trained_parameters())
        if kept is not None:
            return total / max(kept, 1)
        return total / (y != IGNORE_INDEX).sum(dtype=total.dtype).clamp_(min=1)

    def _check_inputs(self, teacher, target) -> None:
        if self.uses_teacher and teacher is None:
            raise ValueError(f"{type(self).__name__} needs teacher logits")
        if self.uses_target and target is None:
            raise ValueError(f"{type(self).__name__} needs targets")

    def _batch(self, student: Tensor, teacher: Tensor | None, target: Tensor | None) -> Tensor:
        """:meth:`batch_value` on kept rows ``[n, C]``; 0 (zero gradients) when ``n`` is 0."""
        s = upcast(student)
        if s.shape[0] == 0:
            return s.sum() * 0.0
        s, t, scale = self.sides(s, None if teacher is None else upcast(teacher), target)
        value = self.batch_value(s, t, target if self.uses_target else None)
        if scale is None:
            return value
        if scale.dim() != 0:
            raise ConfigError(f"transforms: {type(self).__name__} is a batch-level loss, so a transform's "
                              "scale must be one number, not one per row (use a global mode)")
        return value * scale

    def _forward_outputs(self, student, teacher, target: Tensor | None) -> Tensor:
        """The loss from :class:`kdcore.Outputs`: fused (:mod:`kdcore.losses.fused`) where
        ``chunk_size`` is set and a model gave ``hidden`` and ``head`` without
        logits, from their logits otherwise (the same value and gradients). A
        batch-level loss projects only the kept rows, in one piece."""
        teacher = teacher if self.uses_teacher else None
        self._check_inputs(teacher, target)
        if self.batch_level:
            keep = None if target is None else target.reshape(-1) != IGNORE_INDEX
            s, t = _kept_logits(student, keep), _kept_logits(teacher, keep)
            y = None if target is None else target.reshape(-1)[keep]
            flatten_rows(s, t, y)  # shape checks
            return self._batch(s, t, y)
        fuse = self.chunk_size is not None and any(
            isinstance(o, Outputs) and o.projectable and not o.has_logits for o in (student, teacher))
        if not fuse:
            return self.forward(_logits(student), _logits(teacher), target)
        total, count = fused_kept_sum(self.kept_sum, self.chunk_size, _pair(student),
                                      None if teacher is None else _pair(teacher), target,
                                      self.lean_kd_temperature(), params=self.trained_parameters())
        return total / count.to(total.dtype).clamp(min=1)

    def trained_parameters(self) -> list[Tensor]:
        """The loss's own parameters that require grad (its transforms' among them):
        the fused and chunked paths take their gradients chunk by chunk too. A lazy
        parameter not yet materialised (the engine materialises them before the
        first step) is left out."""
        return [p for p in self.parameters()
                if p.requires_grad and not isinstance(p, nn.parameter.UninitializedParameter)]

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}"
