"""What a model produced for a batch: :class:`Outputs`.

A backbone's forward returns either a logits tensor or an :class:`Outputs`.
The engine hands loss terms with ``uses_outputs = True`` the whole object
(logits, tapped ``features``, last ``hidden`` state and the output ``head``);
logit losses receive it too and, with ``chunk_size`` set and ``hidden`` and
``head`` present, project the hidden states chunk by chunk instead of reading
``logits`` (the fused path for large vocabularies).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from kdcore.common.errors import ConfigError

Head = Callable[[Tensor], Tensor]


def _no_logits(features: Mapping[str, Any] | None, hidden: Tensor | None, head: Head | None) -> str:
    """The one line for outputs a model gave without logits: every model is evaluated
    (accuracy, NLL, ``best.pt``) and a teacher's soft labels read from its logits."""
    given = [name for name, value in (("features", features or None), ("hidden", hidden), ("head", head))
             if value is not None]
    return (f"kdcore.Outputs: a model's outputs need logits, or both hidden and head to compute them "
            f"(got {', '.join(given) or 'nothing'}): the engine evaluates every model by its logits; "
            "return the logits with the features, Outputs(logits, features=...)")


@dataclasses.dataclass(init=False, repr=False, eq=False)
class Outputs:
    """A model's outputs for one batch.

    - ``logits``: ``[N, C]`` or ``[B, T, V]``; computed once from
      ``head(hidden)`` on first read when the model gave only those; required
      (itself, or ``hidden`` and ``head``): without them a :class:`kdcore.ConfigError`,
      since the engine evaluates every model by its logits;
    - ``features``: tap name (a ``named_modules()`` path) -> that module's output;
    - ``hidden``: the last hidden state ``[..., H]`` (or None);
    - ``head``: ``head(hidden) -> logits``, the output layer including any final
      soft-capping or logit scale (or None);
    - ``index``: the dataset indices of the batch's samples ``[N]`` (set by the
      engine; memory banks and teacher stores key on them), or None;
    - ``known``: where a teacher knows only some positions (a teacher with another
      tokenizer, kdcore-lm's ``cross_tokenizer``), a bool mask of the positions
      (the logits' shape without the last dim) its logits hold; the engine drops
      the other positions from every term that uses this teacher
      (:meth:`known_target`). None: every position.

    It is a dataclass so that wrappers which look for the tensors in a module's
    output find them: FSDP2 hooks each gradient-carrying field (logits, hidden
    state, features) to gather the sharded parameters again for the backward.
    """

    __slots__ = ("_logits", "features", "hidden", "head", "index", "known")
    _logits: Tensor | None
    features: dict[str, Any]
    hidden: Tensor | None
    head: Head | None
    index: Tensor | None
    known: Tensor | None

    def __init__(self, logits: Tensor | None = None, *, features: Mapping[str, Any] | None = None,
                 hidden: Tensor | None = None, head: Head | None = None, index: Tensor | None = None,
                 known: Tensor | None = None):
        if logits is None and (hidden is None or head is None):
            raise ConfigError(_no_logits(features, hidden, head))
        self._logits = logits
        self.features: dict[str, Any] = dict(features or {})
        self.hidden, self.head, self.index, self.known = hidden, head, index, known

    @classmethod
    def of(cls, value: "Tensor | Outputs") -> "Outputs":
        """``value`` as :class:`Outputs` (a tensor is ``Outputs(logits=value)``)."""
        if isinstance(value, Outputs):
            return value
        if isinstance(value, Tensor):
            return cls(value)
        raise TypeError(f"a model must return a logits tensor or kdcore.Outputs, got {type(value).__name__}")

    @property
    def logits(self) -> Tensor:
        """The logits, computed from ``head(hidden)`` on first use (once)."""
        if self._logits is None:
            self._logits = self.head(self.hidden)
        return self._logits

    @property
    def has_logits(self) -> bool:
        """Whether the logits exist already (False: reading them projects ``hidden``)."""
        return self._logits is not None

    def known_target(self, target: Tensor | None) -> Tensor | None:
        """``target`` with ``-100`` (ignored) at the positions these outputs do not know
        (``known`` False), so that a term comparing with them skips those positions;
        ``target`` itself where every position is known. Without a target (a term over
        every row, ``rows = "all"``, whose loss does not read labels) and with positions
        unknown: class 0 at the known positions and ``-100`` at the others."""
        if self.known is None:
            return target
        if target is None:
            target = self.known.new_zeros(self.known.shape, dtype=torch.long)
        return target.masked_fill(~self.known.to(target.device), -100)

    @property
    def projectable(self) -> bool:
        """Whether ``hidden`` and ``head`` are there (the fused path applies)."""
        return self.hidden is not None and self.head is not None

    def __repr__(self) -> str:
        parts = []
        if self._logits is not None:
            parts.append(f"logits={tuple(self._logits.shape)}")
        if self.hidden is not None:
            parts.append(f"hidden={tuple(self.hidden.shape)}")
        if self.features:
            parts.append(f"features={sorted(self.features)}")
        return f"Outputs({', '.join(parts)})"
