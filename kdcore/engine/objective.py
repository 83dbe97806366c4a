"""The training objective ``L = sum_i w_i(t) * L_i`` built from ``[[loss]]`` tables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from torch import Tensor

from kdcore.config import Config
from kdcore.errors import ConfigError
from kdcore.losses import build
from kdcore.registry import Registry
from kdcore.schedule import Progress


@attrs.define
class Term:
    """One loss term: its label, loss object, base weight and time schedule."""

    id: str
    loss: Any
    weight: float
    schedule: Any = None

    @property
    def uses_teacher(self) -> bool:
        return getattr(self.loss, "uses_teacher", True)

    @property
    def role(self) -> str:
        """``"kd"`` for a term that uses the teacher, ``"ce"`` otherwise."""
        return "kd" if self.uses_teacher else "ce"

    def weight_at(self, progress: Progress) -> float:
        return self.weight if self.schedule is None else self.weight * float(self.schedule(progress))


class Objective:
    """The weighted sum of loss terms."""

    def __init__(self, terms: list[Term]):
        self.terms = terms
        self.uses_teacher = any(t.uses_teacher for t in terms)

    @classmethod
    def from_config(cls, config: Config, registry: Registry) -> "Objective":
        terms = []
        for i, (term, tid) in enumerate(zip(config.loss, config.term_ids())):
            path = f"loss[{i}]"
            try:
                loss = registry.create("loss", term.name, **term.params)
            except ConfigError as exc:
                raise exc.with_path(path) from None
            schedule = None
            if term.schedule is not None:
                schedule = build("scheduler", term.schedule, f"{path}.schedule")
                if not callable(schedule):
                    raise ConfigError(f"{path}.schedule: {term.schedule!r} is not a time schedule")
            terms.append(Term(tid, loss, term.weight, schedule))
        objective = cls(terms)
        if objective.uses_teacher and config.teacher is None:
            names = [t.id for t in terms if t.uses_teacher]
            raise ConfigError(f"teacher: required by loss term(s) {', '.join(names)} (add a [teacher] table)")
        return objective

    def weights(self, progress: Progress) -> dict[str, float]:
        return {t.id: t.weight_at(progress) for t in self.terms}

    def active(self, weights: Mapping[str, float], names=None) -> list[Term]:
        """Terms with a non-zero weight (among ``names`` if given)."""
        return [t for t in self.terms if weights[t.id] != 0.0 and (names is None or t.id in names)]

    def losses(self, student: Tensor, teacher: Tensor | None, target: Tensor,
               weights: Mapping[str, float], names=None) -> dict[str, Tensor]:
        """Unweighted value of every active term (among ``names`` if given)."""
        return {t.id: t.loss(student, teacher, target) for t in self.active(weights, names)}

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
