"""What every feature loss shares: taps, ``bind``, feature lookup, lazy connectors.

The engine seam (contract, "Model outputs, feature taps and trainable loss terms"):

* ``uses_outputs = True``: the loss is called ``loss(student_outputs,
  teacher_outputs, target)`` with :class:`kdcore.Outputs`;
* ``student_taps`` / ``teacher_taps``: the module paths the engine hooks; they
  come from the parameters ``student_layers`` / ``teacher_layers`` (a path or a
  list of paths, pairs in order) or, where those are None, from
  :func:`kdcore_features.taps.default_taps` of the models, resolved by
  ``bind(student_model, teacher_model)``, which the engine calls before it reads
  the taps;
* connectors whose shapes depend on the features are created on the first call,
  from the shapes, device and dtype of the first batch's features (not torch's
  ``Lazy*`` modules, which keep the dtype they were constructed with). Until then the
  loss holds an :class:`torch.nn.parameter.UninitializedParameter` (``_pending``),
  so the engine runs one shape-inference pass
  (no grad) on the first batch before it builds the optimizer; that pass changes
  no state but the connectors' creation (CRD's bank and normaliser only move in
  calls with grad enabled).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdcore.common.errors import ConfigError
from kdcore.losses.outputs import Outputs
from kdcore_features.taps import Taps, default_taps


def as_paths(value: Any, name: str, where: str) -> list[str] | None:
    """``student_layers`` / ``teacher_layers`` as a list of paths (None stays None)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{name}: {where} takes a module path or a non-empty list of module paths, got {value!r}")
    return list(value)


def connector_dtype(x: Tensor) -> torch.dtype:
    """Connectors are float64 for float64 features, else the default dtype (float32 under autocast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.get_default_dtype()


def pool_vector(f: Tensor) -> Tensor:
    """``[N, C, H, W]`` -> its global spatial average ``[N, C]``; ``[N, D]`` unchanged; else flattened."""
    if f.dim() == 4:
        return f.mean((2, 3))
    return f.reshape(f.shape[0], -1)


def match_spatial(name: str, fs: Tensor, ft: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive average pooling of the larger map to the smaller one's size (AT, VID; mdistiller)."""
    if fs.dim() != 4 or ft.dim() != 4:
        raise ValueError(f"{name}: needs [N, C, H, W] feature maps, got student {tuple(fs.shape)} "
                         f"and teacher {tuple(ft.shape)}")
    if fs.shape[0] != ft.shape[0]:
        raise ValueError(f"{name}: batch sizes differ, student {tuple(fs.shape)} vs teacher {tuple(ft.shape)}")
    (hs, ws), (ht, wt) = fs.shape[-2:], ft.shape[-2:]
    if (hs, ws) == (ht, wt):
        return fs, ft
    if hs >= ht and ws >= wt:
        return F.adaptive_avg_pool2d(fs, (ht, wt)), ft
    if hs <= ht and ws <= wt:
        return fs, F.adaptive_avg_pool2d(ft, (hs, ws))
    raise ValueError(f"{name}: cannot pool student {tuple(fs.shape)} and teacher {tuple(ft.shape)} "
                     "to one spatial size")


class FeatureLoss(nn.Module):
    """Base of the feature losses: taps, ``bind`` and feature lookup.

    Subclasses set ``name`` (for messages) and ``choose`` (which of a model's
    default :class:`Taps` they read) and implement :meth:`compute`.
    """

    uses_outputs = True
    uses_teacher = True
    batch_level = False
    name = "feature"
    #: a model's default taps -> the paths this loss reads by default
    choose: Callable[[Taps], list[str]] = staticmethod(lambda taps: list(taps.stages))

    def __init__(self, student_layers: Any = None, teacher_layers: Any = None):
        super().__init__()
        self.student_layers = as_paths(student_layers, self.name, "student_layers")
        self.teacher_layers = as_paths(teacher_layers, self.name, "teacher_layers") if self.uses_teacher else None
        self.student_taps: list[str] | None = self.student_layers
        self.teacher_taps: list[str] | None = self.teacher_layers if self.uses_teacher else []
        self._check_pairs()

    # -- taps -----------------------------------------------------------------------------------
    def _check_pairs(self) -> None:
        if not self.uses_teacher or self.student_taps is None or self.teacher_taps is None:
            return
        if len(self.student_taps) != len(self.teacher_taps):
            raise ConfigError(f"{self.name}: student_layers and teacher_layers pair in order and must have the "
                              f"same length, got {self.student_taps} and {self.teacher_taps}")

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Resolve the taps left as None from the models' :func:`default_taps` (called by the
        engine before it reads ``student_taps`` / ``teacher_taps``)."""
        if self.student_layers is None:
            self.student_taps = self._defaults(student, "student")
        if self.uses_teacher and self.teacher_layers is None:
            if teacher is None:
                raise ConfigError(f"{self.name}: needs a teacher model for its default teacher taps")
            self.teacher_taps = self._defaults(teacher, "teacher")
        self._check_pairs()

    def _defaults(self, model: nn.Module, side: str) -> list[str]:
        try:
            return list(type(self).choose(default_taps(model)))
        except ConfigError as exc:
            raise ConfigError(f"{self.name}: {side}: {exc}") from None

    def _features(self, outputs: Outputs | None, side: str) -> list[Tensor]:
        taps = self.student_taps if side == "student" else self.teacher_taps
        if taps is None:
            raise ConfigError(f"{self.name}: {side}_layers not set and bind() not called (name the modules "
                              "or let the engine bind the models)")
        if outputs is None:
            raise ValueError(f"{self.name}: needs the {side}'s outputs, got None")
        try:
            feats = [outputs.features[p] for p in taps]
        except KeyError as exc:
            raise ValueError(f"{self.name}: {side} feature {exc.args[0]!r} is not in outputs.features "
                             f"(has {sorted(outputs.features)})") from None
        if side == "teacher":
            feats = [f.detach() for f in feats]
        return feats

    def forward(self, student: Outputs, teacher: Outputs | None, target: Tensor | None = None) -> Tensor:
        fs = self._features(student, "student")
        ft = self._features(teacher, "teacher") if self.uses_teacher else []
        return self.compute(fs, ft, student, teacher, target)

    def compute(self, fs: list[Tensor], ft: list[Tensor], student: Outputs, teacher: Outputs | None,
                target: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"student_taps={self.student_taps}, teacher_taps={self.teacher_taps}"


class LazyConnectors(FeatureLoss):
    """A feature loss whose connectors are built by :meth:`build` on the first call.

    ``_pending`` (an UninitializedParameter) marks the loss as not yet materialised,
    so the engine runs its shape-inference pass before building the optimizer;
    the first call builds the connectors on the features' device and removes it.
    """

    def __init__(self, student_layers: Any = None, teacher_layers: Any = None):
        super().__init__(student_layers, teacher_layers)
        self._pending = nn.parameter.UninitializedParameter()

    @property
    def materialised(self) -> bool:
        return "_pending" not in self._parameters

    def forward(self, student: Outputs, teacher: Outputs | None, target: Tensor | None = None) -> Tensor:
        fs = self._features(student, "student")
        ft = self._features(teacher, "teacher") if self.uses_teacher else []
        if not self.materialised:
            built = self.build(fs, ft, student, teacher)
            ref = fs[0]
            for key, module in built.items():
                setattr(self, key, module.to(device=ref.device, dtype=connector_dtype(ref)))
            del self._pending
        return self.compute(fs, ft, student, teacher, target)

    def build(self, fs: list[Tensor], ft: list[Tensor], student: Outputs,
              teacher: Outputs | None) -> dict[str, nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError
