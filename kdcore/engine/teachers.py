"""Which teacher each loss term uses, with several teachers (``[teachers.NAME]``), and
the ensemble a term naming several of them sees (docs/teachers.md).

A term names its teacher (``teacher = "NAME"``) or several (``teacher = ["a", "b"]``,
with ``ensemble`` and ``teacher_weights``); with one teacher it needs to name none.
:func:`bind` resolves a term's table to ``(names, ensemble, weights)`` and refuses what
cannot work; :func:`check_all_used` refuses a teacher that no term uses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kdcore.common.errors import ConfigError
from kdcore.config import Config, LossTermConfig
from kdcore.losses.outputs import Outputs

#: a term's teachers: their names (several: an ensemble), the ensemble's reduction and its
#: weights normalised to sum 1 (None: equal weights)
Binding = tuple[tuple[str, ...], str, tuple[float, ...] | None]


def ensemble_outputs(outputs: Sequence[Outputs], reduction: str = "probs",
                     weights: Sequence[float] | None = None) -> Outputs:
    """The ensemble of several teachers' outputs, as logits over the same classes (in float32):
    ``"probs"``: ``log(sum_i w_i softmax(z_i))``, the log of the (weighted) mean of the
    teachers' probabilities, which a loss takes as logits (its softmax is that mean);
    ``"logits"``: ``sum_i w_i z_i``, the (weighted) mean of their logits. ``weights`` sum to 1
    (None: equal weights). A teacher giving ``Outputs(hidden, head)`` has its logits computed.
    Where teachers know only some positions (``Outputs.known``), the ensemble knows the
    positions that every teacher knows."""
    weights = [1.0 / len(outputs)] * len(outputs) if weights is None else list(weights)
    parts = [(w, o.logits.float()) for w, o in zip(weights, outputs) if w > 0]
    if reduction == "logits":
        logits = sum(w * z for w, z in parts)
    else:
        logits = torch.logsumexp(torch.stack([torch.log_softmax(z, -1) + math.log(w) for w, z in parts]), 0)
    masks = [o.known for o in outputs if o.known is not None]
    known = functools.reduce(torch.logical_and, masks) if masks else None
    return Outputs(logits=logits, index=outputs[0].index, known=known)


class StepTeachers(dict):
    """One step's teachers' outputs by name, which make each ensemble the step's terms name
    once (:meth:`ensemble`), however many terms use it."""

    def __init__(self, outputs: Mapping[str, Outputs]):
        super().__init__(outputs)
        self._ensembles: dict[tuple, Outputs] = {}

    @classmethod
    def of(cls, outputs: Mapping[str, Outputs]) -> "StepTeachers":
        """``outputs`` itself where it is one already (its ensembles kept), else wrapped."""
        return outputs if isinstance(outputs, cls) else cls(outputs)

    def select(self, names: Sequence[str], reduction: str, weights: Sequence[float] | None) -> Outputs:
        """Teacher ``names[0]``'s outputs, or for several names their :func:`ensemble_outputs`,
        made on first use in this step."""
        if len(names) == 1:
            return self[names[0]]
        key = (tuple(names), reduction, None if weights is None else tuple(weights))
        if key not in self._ensembles:
            self._ensembles[key] = ensemble_outputs([self[n] for n in names], reduction, weights)
        return self._ensembles[key]


def bind(spec: LossTermConfig, config: Config, path: str, uses_teacher: bool,
         teacher_taps: Sequence[str] = ()) -> Binding:
    """The teacher(s) the term at ``path`` uses, from its table (``teacher``, ``ensemble``,
    ``teacher_weights``), or the only teacher where it names none; a term that uses no
    teacher has none. Refused (:class:`ConfigError`): a teacher key on a term without a
    teacher, no name among several teachers, an ensemble for a term that taps the
    teacher's layers (``teacher_taps``) or of a stored teacher."""
    none: Binding = ((), "probs", None)
    tables = config.teacher_tables()
    names = list(tables)
    if spec.teacher is not None and not uses_teacher:
        raise ConfigError(f"{path}.teacher: loss {spec.name!r} does not use a teacher; remove the key")
    if not uses_teacher or not names:
        return none
    if spec.teacher is None:
        if len(names) > 1:
            raise ConfigError(f"{path}.teacher: required with several teachers: name one of "
                              f"{', '.join(names)} (teacher = \"NAME\"), or several for an ensemble")
        return (names[0],), "probs", None
    chosen = (spec.teacher,) if isinstance(spec.teacher, str) else tuple(spec.teacher)
    if len(chosen) == 1:
        return chosen, "probs", None
    if teacher_taps:
        raise ConfigError(f"{path}.teacher: an ensemble has no layers to tap, and this term taps the "
                          f"teacher's {', '.join(teacher_taps)}; name one teacher")
    stored = [n for n in chosen if tables[n].signals.source == "store"]
    if stored:
        raise ConfigError(f"{path}.teacher: {stored[0]!r} is a stored teacher (top-k buckets, not whole "
                          "distributions); an ensemble takes teachers with source = 'model'")
    weights = None
    if spec.teacher_weights is not None:
        total = sum(spec.teacher_weights)
        weights = tuple(w / total for w in spec.teacher_weights)
    return chosen, spec.ensemble, weights


def used_by(terms: Sequence[Any]) -> list[str]:
    """The names of the teachers ``terms`` use, in order: the ones a step must run."""
    return list(dict.fromkeys(n for t in terms if t.uses_teacher for n in t.teachers))


def check_all_used(terms: Sequence[Any], config: Config) -> None:
    """A ``[teachers.NAME]`` table that no term (its ``teachers``) uses is a mistake (a
    teacher built for nothing)."""
    if config.teachers is None:
        return
    used = {n for t in terms for n in t.teachers}
    for name in config.teachers:
        if name not in used:
            users = [t.path for t in terms if t.uses_teacher]
            hint = f"name it in a term ({', '.join(users)}: teacher = \"{name}\")" if users else \
                "add a term that uses it"
            raise ConfigError(f"teachers.{name}: no loss term uses teacher {name!r}; {hint}, or remove the table")
