"""The DIST loss (Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher")."""

from __future__ import annotations

import torch
from torch import Tensor

import kdcore
from kdcore.common import params
from kdcore_dist.correlation import pearson


class DIST(kdcore.LogitLoss):
    """Loss ``dist``: relations between the predictions of a batch (Huang et al. 2022, sec. 3).

    With ``Y^s = softmax(Z^s / T)`` and ``Y^t = softmax(Z^t / T)`` (``[B, C]``,
    the batch's kept rows) and ``d_p = 1 - rho_p`` (:func:`~kdcore_dist.pearson`):

    - inter-class relation (sec. 3.3): ``L_inter = T^2 / B * sum_i d_p(Y^s_i, Y^t_i)``,
      each sample's probabilities correlated across the classes;
    - intra-class relation (sec. 3.4): ``L_intra = T^2 / C * sum_j d_p(Y^s_:j, Y^t_:j)``,
      each class's probabilities correlated across the batch;
    - ``L = beta * L_inter + gamma * L_intra`` (the distillation part of the
      paper's total loss; add ``ce`` as another term for ``alpha * L_cls``).

    The intra-class relation couples the rows of a batch, so the loss is
    batch-level (``batch_level = True``): it gets the batch's kept rows at once
    (token-level positions with target -100 removed) and refuses
    ``chunk_size``. Defaults follow the paper's ImageNet setting
    (``T = 1``, ``beta = gamma = 1``); its CIFAR-100 setting is ``T = 4``,
    ``beta = gamma = 2``. A class whose probability is the same for every
    sample in both models (e.g. a padded ``-inf`` column) has distance 0 and
    still counts in ``C``.
    """

    batch_level = True

    def __init__(self, *, temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0, transforms=None,
                 chunk_size: int | None = None):
        super().__init__(temperature=temperature, transforms=transforms, chunk_size=chunk_size)
        self.beta = params.non_negative("beta", beta)
        self.gamma = params.non_negative("gamma", gamma)

    def relations(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """``(L_inter, L_intra)`` of rows ``[B, C]``, each already multiplied by ``T^2``."""
        t = self.temperature
        ys, yt = torch.softmax(student / t, dim=-1), torch.softmax(teacher / t, dim=-1)
        inter = (1.0 - pearson(ys, yt, dim=1)).mean()
        intra = (1.0 - pearson(ys, yt, dim=0)).mean()
        return t * t * inter, t * t * intra

    def batch_value(self, student: Tensor, teacher: Tensor, target: Tensor | None) -> Tensor:
        inter, intra = self.relations(student, teacher)
        return self.beta * inter + self.gamma * intra

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}, beta={self.beta:g}, gamma={self.gamma:g}"
