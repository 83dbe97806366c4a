"""Forward passes: a model's outputs with the taps its loss terms name, and the
student's and teacher's outputs for one (micro-)batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from kdcore.common.errors import ConfigError
from kdcore.engine import teachers
from kdcore.engine.batches import Batch
from kdcore.engine.objective import Objective
from kdcore.engine.runtime import Runtime
from kdcore.engine.taps import Tapping
from kdcore.losses.outputs import Outputs


def forward(model: nn.Module, inputs, tapped: nn.Module, taps: Sequence[str], index: Tensor) -> Outputs:
    """``model(inputs)`` (keyword arguments for a mapping) as :class:`Outputs`, with the
    outputs of the ``taps`` modules of ``tapped`` (the unwrapped model) in ``features``."""
    if taps:
        with Tapping(tapped, taps) as features:
            raw = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    else:
        features = None
        raw = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    out = Outputs.of(raw)
    if features:
        out.features.update(features)
    if out.index is None:
        out.index = index
    return out


def check_sharded_outputs(out: Outputs) -> None:
    """Under FSDP (``run.strategy = "fsdp"``) the student must return its logits:
    a head called after FSDP's forward (the fused projection, or logits computed
    on first read) takes its gradients outside FSDP's gradient reduction, and
    the ranks' weights drift apart silently. Refused as a config error."""
    if out.projectable and not out.has_logits:
        raise ConfigError("student: under run.strategy = 'fsdp' the student must return its logits, not "
                          "hidden states and a head to project later (the head would run outside FSDP's "
                          "gradient reduction); for the hf backbone set student.fused = false or \"auto\"")


def prefer_logits(student: nn.Module) -> None:
    """Ask a student about to be sharded by FSDP to compute its logits inside forward:
    its ``prefer_logits()`` method, where it has one (a backbone that chooses between
    returning logits and the fused ``Outputs(hidden, head)`` by itself), so that a config
    that trains in one process trains under FSDP unchanged."""
    prefer = getattr(student, "prefer_logits", None)
    if callable(prefer):
        prefer()


class Forward:
    """``forward(batch, terms, model) -> (student outputs, teacher outputs or None)``.

    The student runs through ``model`` (the student, or its DDP wrapper or
    compiled form) with the taps ``terms`` name on the unwrapped ``student``;
    the teacher's outputs come from the run's teacher source, under
    ``no_grad``, where a term uses the teacher. With several teachers
    (``teacher_source`` a mapping by name) the outputs are a mapping by name of
    the teachers ``terms`` use, each teacher run once with the taps of the terms
    bound to it. Under FSDP the student is asked to return its logits
    (:func:`prefer_logits`) and must (:func:`check_sharded_outputs`).
    """

    def __init__(self, runtime: Runtime, student: nn.Module, objective: Objective, teacher_source, sharded: bool):
        self.runtime, self.student, self.objective = runtime, student, objective
        self.teacher_source, self.sharded = teacher_source, sharded
        if sharded:
            prefer_logits(student)

    def __call__(self, batch: Batch, terms, model: nn.Module) -> tuple[Outputs, Outputs | dict[str, Outputs] | None]:
        inputs = self.runtime.inputs(batch.inputs)
        taps = self.objective.has_taps
        s = forward(model, inputs, self.student, self.objective.taps(terms, "student") if taps else (), batch.index)
        if self.sharded:
            check_sharded_outputs(s)
        t = None
        if self.teacher_source is not None and any(term.uses_teacher for term in terms):
            with torch.no_grad():
                t = self._teachers(batch, inputs, terms, taps)
        return s, t

    def _teachers(self, batch: Batch, inputs, terms, taps: bool) -> Outputs | dict[str, Outputs]:
        """The teacher's outputs, or with several teachers those ``terms`` use, by name."""
        source, objective = self.teacher_source, self.objective
        if not isinstance(source, Mapping):
            return source(batch, inputs, objective.taps(terms, "teacher") if taps else ())
        return {name: source[name](batch, inputs, objective.taps(terms, "teacher", name) if taps else ())
                for name in teachers.used_by(terms)}


def materialise_lazy_terms(fwd: Forward, batches) -> None:
    """Run the loss terms once on the first batch, without learning, when a term
    creates its connectors from the features' shapes (lazy modules)."""
    objective, student = fwd.objective, fwd.student
    if not any(isinstance(p, nn.parameter.UninitializedParameter) for p in objective.modules.parameters()):
        return
    rng = torch.get_rng_state()
    batch = next(iter(batches.epoch(torch.Generator().manual_seed(0))))
    was = student.training
    student.eval()
    with torch.no_grad():
        weights = {t.id: 1.0 for t in objective.terms}
        s, t = fwd(batch, objective.active(weights), student)
        objective.losses(s, t, batch.target, weights)
    student.train(was)
    torch.set_rng_state(rng)
