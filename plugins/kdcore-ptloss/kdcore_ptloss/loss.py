"""The ``ptloss`` loss term (PTLoss paper eq. 7)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from kdcore.losses import LogitLoss, Spec
from kdcore.losses.functional import log_softmax_t
from kdcore_ptloss.coefficients import as_list, parse_eps, per_class
from kdcore_ptloss.functional import ptloss_rows


class PTLoss(LogitLoss):
    """``ptloss``: perturbed distillation loss, PTLoss paper eq. 7, with Hinton's
    temperature convention:

    ``T^2 * [KL(p^T || q^T) + sum_c p^T_c sum_{m=1..M} eps_{c,m} (1 - q^T_c)^m]``

    - ``eps``: the coefficients, a list of ``M`` numbers shared by all classes
      or a ``C x M`` table (one row per class). ``eps = 0`` is exactly ``kd``.
      Default ``[0.0]`` (plain KD); choose them with
      :func:`kdcore_ptloss.search` / ``kdcore ptloss-search`` (alg. 1).
    - ``temperature``: T (default 1, the paper's setting).
    - ``transforms``, ``chunk_size``: as for every logit loss.
    """

    def __init__(self, *, eps: Any = (0.0,), temperature: float = 1.0,
                 transforms: Sequence[Spec] | None = None, chunk_size: int | None = None):
        super().__init__(temperature=temperature, transforms=transforms, chunk_size=chunk_size)
        self.register_buffer("eps", parse_eps(eps).float(), persistent=False)

    def rows(self, student: Tensor, teacher: Tensor, target: Tensor | None) -> Tensor:
        t = self.temperature
        eps = per_class(self.eps.to(device=student.device, dtype=student.dtype), student.shape[-1])
        return t * t * ptloss_rows(log_softmax_t(teacher, t), log_softmax_t(student, t), eps)

    def extra_repr(self) -> str:
        return f"eps={as_list(self.eps)}, temperature={self.temperature:g}"
