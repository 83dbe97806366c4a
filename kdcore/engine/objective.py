"""The training objective ``L = sum_i w_i(t) * L_i`` built from ``[[loss]]`` tables.

Each term gets what its loss declares it needs (class attributes, see
docs/plugins.md): a loss with ``uses_outputs = True`` is called with the two
models' :class:`kdcore.Outputs`, its taps (``student_taps``, ``teacher_taps``)
filled; a :class:`kdcore.LogitLoss` with the outputs too where the fused
projection applies (``hidden`` and ``head`` without logits), otherwise with
logits; any other callable with logits. With a stored teacher
(:class:`kdcore.signals.buckets.TopKOutputs`) every term that uses the teacher sees
both models over the teacher's k + 1 buckets. Losses that are ``nn.Module`` s may own
parameters and buffers: :attr:`Objective.modules` holds them for the optimizer
and the checkpoints.

With several teachers (``[teachers.NAME]``) each term is bound to the teacher it
names (:attr:`Term.teachers`), the teachers' outputs arrive as a mapping by name,
and a term naming several teachers sees their ensemble
(:func:`kdcore.engine.teachers.ensemble_outputs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from torch import Tensor, nn

from kdcore.common.errors import ConfigError, LossTermFailure, PluginError, RunFailure, UnknownComponentError
from kdcore.config import Config
from kdcore.engine import teachers
from kdcore.engine.taps import check_taps, tap_paths
from kdcore.losses import LogitLoss, build
from kdcore.losses.outputs import Outputs
from kdcore.losses.schedule import Progress
from kdcore.losses.weighting import GradientWeighting
from kdcore.plugins.registry import Registry
from kdcore.signals.buckets import TopKOutputs, bucket_loss


#: exceptions whose message kdcore or the loss wrote for the user already: a term passes them on unchanged
_EXPLAINED = (ConfigError, UnknownComponentError, PluginError, RunFailure)


def _first_line(exc: BaseException) -> str:
    """``Type: message`` of ``exc``, cut to its first line (a message must stay one line)."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _not_scalar(value: Any) -> str | None:
    """What is wrong with a term's value, or None for a 0-dim tensor. Reads only the
    type and the shape, never the values: no device synchronisation on the hot path."""
    if isinstance(value, Tensor):
        return None if value.dim() == 0 else f"returned a tensor of shape {list(value.shape)}, not a scalar"
    what = "None" if value is None else f"a {type(value).__name__}"
    return f"returned {what}, not a scalar tensor"


@attrs.define
class Term:
    """One loss term: its label, config path, loss object, base weight and time schedule."""

    id: str
    loss: Any
    weight: float
    schedule: Any = None
    path: str = "loss"
    #: ``"labelled"``: the loss sees the targets (rows with target -100 are ignored);
    #: ``"all"``: it is called without targets, so it averages over every row,
    #: the unlabelled rows of a transfer set included
    rows: str = "labelled"
    #: the names of the teachers the term uses (several: an ensemble); () where it names none
    teachers: tuple[str, ...] = ()
    #: an ensemble's reduction, ``"probs"`` or ``"logits"`` (see :func:`~kdcore.engine.teachers.ensemble_outputs`)
    ensemble: str = "probs"
    #: an ensemble's weights, normalised to sum 1 (None: equal weights)
    teacher_weights: tuple[float, ...] | None = None

    @property
    def uses_teacher(self) -> bool:
        return getattr(self.loss, "uses_teacher", True)

    @property
    def uses_outputs(self) -> bool:
        return bool(getattr(self.loss, "uses_outputs", False))

    @property
    def role(self) -> str:
        """``"kd"`` for a term that uses the teacher, ``"ce"`` otherwise."""
        return "kd" if self.uses_teacher else "ce"

    def taps(self, side: str) -> tuple[str, ...]:
        if not self.uses_outputs or (side == "teacher" and not self.uses_teacher):
            return ()
        return tap_paths(getattr(self.loss, f"{side}_taps", ()))

    def weight_at(self, progress: Progress) -> float:
        return self.weight if self.schedule is None else self.weight * float(self.schedule(progress))

    def __call__(self, student: Outputs, teacher: Outputs | Mapping[str, Outputs] | None, target: Tensor,
                 step: int | None = None) -> Tensor:
        """The term's unweighted value, a 0-dim tensor. A loss that raises (other than
        kdcore's own exceptions) or returns anything else is a
        :class:`~kdcore.common.errors.LossTermFailure`
        naming the term and ``step`` (the optimizer step's number, where the caller knows it)."""
        try:
            value = self._value(student, teacher, target)
        except _EXPLAINED:
            raise
        except Exception as exc:
            raise LossTermFailure(self.id, self.path, f"raised {_first_line(exc)}", step) from exc
        problem = _not_scalar(value)
        if problem is not None:
            raise LossTermFailure(self.id, self.path, problem, step)
        return value

    def teacher_outputs(self, teacher: Outputs | Mapping[str, Outputs] | None) -> Outputs | None:
        """This term's teacher outputs: ``teacher`` itself (one teacher), or from a mapping
        by name (several teachers) the bound teacher's, or the ensemble of its teachers."""
        if not isinstance(teacher, Mapping):
            return teacher
        return teachers.StepTeachers.of(teacher).select(self.teachers, self.ensemble, self.teacher_weights)

    def _value(self, student: Outputs, teacher: Outputs | Mapping[str, Outputs] | None, target: Tensor) -> Any:
        """The loss called with what it declares it needs (see the module's docstring)."""
        teacher = self.teacher_outputs(teacher) if self.uses_teacher else None
        if self.rows == "all":
            target = None
        if isinstance(teacher, Outputs):  # a teacher that knows only some positions: only those
            target = teacher.known_target(target)
        if isinstance(teacher, TopKOutputs):  # a stored teacher: both sides on its k + 1 buckets
            return bucket_loss(self.loss, student, teacher, target, outputs=self.uses_outputs)
        if self.uses_outputs:
            return self.loss(student, teacher, target)
        if isinstance(self.loss, LogitLoss) and (_fusable(student) or _fusable(teacher)):
            return self.loss(student, teacher, target)
        return self.loss(student.logits, None if teacher is None else teacher.logits, target)


def _check_all_rows(loss: Any, name: str, config: Config, world: int, path: str) -> None:
    """``rows = "all"`` needs a loss that uses the teacher but not the labels, and one
    micro-batch in one process (micro-batches and ranks are weighted by their
    labelled rows, targets not -100)."""
    if getattr(loss, "uses_target", False) or not getattr(loss, "uses_teacher", True):
        raise ConfigError(f"{path}.rows: 'all' is for a loss that uses the teacher and not the labels "
                          f"(unlabelled rows have none); {name!r} does not qualify")
    if config.run.accumulate > 1 or world > 1:
        raise ConfigError(f"{path}.rows: 'all' needs run.accumulate = 1 in a single process (micro-batches "
                          "and ranks are weighted by their labelled rows)")


def _fusable(outputs: Outputs | None) -> bool:
    return outputs is not None and outputs.projectable and not outputs.has_logits


def _followers(terms: list[Term]) -> list[Any]:
    """The distinct components of ``terms`` that define ``set_progress``: each loss, the
    modules inside it and the transforms of its chain, in order."""
    found: dict[int, Any] = {}
    for term in terms:
        inner = list(term.loss.modules()) if isinstance(term.loss, nn.Module) else [term.loss]
        for component in (*inner, *(getattr(term.loss, "transforms", None) or ())):
            if callable(getattr(component, "set_progress", None)):
                found.setdefault(id(component), component)
    return list(found.values())


def _module_key(term_id: str) -> str:
    return term_id.replace(".", "_")


class Objective:
    """The weighted sum of loss terms."""

    def __init__(self, terms: list[Term]):
        self.terms = terms
        self.uses_teacher = any(t.uses_teacher for t in terms)
        #: whether any term taps features (else forward passes skip the tap machinery)
        self.has_taps = any(t.uses_outputs for t in terms)
        #: the terms' losses that are modules (their parameters and buffers train and checkpoint)
        self.modules = nn.ModuleDict({_module_key(t.id): t.loss for t in terms if isinstance(t.loss, nn.Module)})
        #: the terms' components with ``set_progress`` (see :meth:`set_progress`)
        self.followers = _followers(terms)

    @classmethod
    def from_config(cls, config: Config, registry: Registry, world: int = 1) -> "Objective":
        """The terms of ``config.loss``; ``world`` is the number of processes (a term on
        all rows is refused where micro-batches are weighted by their labelled rows)."""
        terms = []
        for i, (term, tid) in enumerate(zip(config.loss, config.term_ids())):
            path = f"loss[{i}]"
            loss = build("loss", {**term.params, "name": term.name}, path, registry=registry)
            schedule = None
            if term.schedule is not None:
                schedule = build("scheduler", term.schedule, f"{path}.schedule", registry=registry)
                if not callable(schedule):
                    raise ConfigError(f"{path}.schedule: {term.schedule!r} is not a time schedule")
            if term.rows == "all":
                _check_all_rows(loss, term.name, config, world, path)
            terms.append(Term(tid, loss, term.weight, schedule, path, term.rows))
            t = terms[-1]
            t.teachers, t.ensemble, t.teacher_weights = teachers.bind(term, config, path, t.uses_teacher,
                                                                      t.taps("teacher"))
        objective = cls(terms)
        if objective.uses_teacher and not config.teacher_tables():
            names = [t.id for t in terms if t.uses_teacher]
            raise ConfigError(f"teacher: required by loss term(s) {', '.join(names)} (add a [teacher] table)")
        teachers.check_all_used(terms, config)
        return objective

    def bind(self, student: nn.Module, teacher: nn.Module | Mapping[str, nn.Module | None] | None) -> None:
        """Let feature terms see the models (``loss.bind(student, teacher)``, e.g. for
        default taps), then check every tap path against the models. ``teacher``: the
        one teacher, or the teachers' models by name (None for a stored one)."""
        for term in self.terms:
            if not term.uses_outputs:
                continue
            own = teacher
            if isinstance(teacher, Mapping):
                own = teacher.get(term.teachers[0]) if len(term.teachers) == 1 else None
            if callable(getattr(term.loss, "bind", None)):
                term.loss.bind(student, own if term.uses_teacher else None)
            check_taps(student, term.taps("student"), term.path, "student")
            if own is not None:
                check_taps(own, term.taps("teacher"), term.path, "teacher")

    def taps(self, terms: list[Term], side: str, teacher: str | None = None) -> tuple[str, ...]:
        """The union of ``terms``' tap paths on ``side`` ("student" or "teacher"), in order;
        with ``teacher`` (a name) only those of the terms bound to that teacher alone."""
        if teacher is not None:
            terms = [t for t in terms if t.teachers == (teacher,)]
        return tuple(dict.fromkeys(p for t in terms for p in t.taps(side)))

    def weights(self, progress: Progress) -> dict[str, float]:
        """Each term's weight at ``progress``. ``kdcore train`` and ``kdcore_lm.KDTrainer``
        call it before each step's forward, so it first hands ``progress`` to the
        components that follow training time (:meth:`set_progress`)."""
        self.set_progress(progress)
        return {t.id: t.weight_at(progress) for t in self.terms}

    def set_progress(self, progress: Progress) -> None:
        """Call ``set_progress(progress)`` on every loss, module inside a loss, and
        transform of a term's chain that defines it (e.g. ``ctkd``'s curriculum)."""
        for component in self.followers:
            component.set_progress(progress)

    def active(self, weights: Mapping[str, float], names=None) -> list[Term]:
        """Terms with a non-zero weight (among ``names`` if given)."""
        return [t for t in self.terms if weights[t.id] != 0.0 and (names is None or t.id in names)]

    def losses(self, student: Outputs, teacher: Outputs | Mapping[str, Outputs] | None, target: Tensor,
               weights: Mapping[str, float], names=None, step: int | None = None) -> dict[str, Tensor]:
        """Unweighted value of every active term (among ``names`` if given); ``step``, the
        optimizer step's number, goes into the message of a term that fails. Several teachers'
        outputs are wrapped so that an ensemble that several terms name is made once."""
        if isinstance(teacher, Mapping):
            teacher = teachers.StepTeachers.of(teacher)
        return {t.id: t(student, teacher, target, step) for t in self.active(weights, names)}

    @staticmethod
    def total(losses: Mapping[str, Tensor], coefs: Mapping[str, float]) -> Tensor | None:
        """``sum_i c_i * L_i`` without multiplications by 1 (None when no term is active)."""
        total = None
        for k, v in losses.items():
            c = float(coefs[k])
            term = v if c == 1.0 else c * v
            total = term if total is None else total + term
        return total

    def roles(self) -> dict[str, str]:
        return {t.id: t.role for t in self.terms}

    def batch_level_terms(self) -> list[str]:
        """Ids of the terms whose loss couples the rows of a batch (``batch_level = True``)."""
        return [t.id for t in self.terms if getattr(t.loss, "batch_level", False)]


def build_weighting(config: Config, registry: Registry) -> GradientWeighting | None:
    """The ``[weighting]`` scheduler that weighs the terms from their gradients, or None."""
    wc = config.weighting
    if wc is None:
        return None
    w = build("scheduler", {**wc.params, "name": wc.name}, "weighting", registry=registry)
    if not isinstance(w, GradientWeighting):
        raise ConfigError(f"weighting.name: {wc.name!r} is not a gradient-aware scheduler "
                          "(use it as a term's schedule instead)")
    if config.run.amp == "fp16":
        raise ConfigError("run.amp: 'fp16' is not supported with [weighting] (use 'bf16')")
    if config.run.accumulate > 1:
        raise ConfigError("run.accumulate: gradient-aware [weighting] needs whole batches (accumulate = 1)")
    return w


def build_batch_policy(config: Config, registry: Registry):
    """The ``[batch_policy]`` component that replaces each step's batch
    (:mod:`kdcore.losses.policy`), or None."""
    pc = config.batch_policy
    if pc is None:
        return None
    return build("batch_policy", {**pc.params, "name": pc.name}, "batch_policy", registry=registry)
