"""kdcore-dist: DIST (Huang et al. 2022, "Knowledge Distillation from A Stronger
Teacher") as a kdcore plugin, written only against kdcore's public API.

- loss ``dist`` (:class:`DIST`): a batch-level loss, the inter-class and the
  intra-class Pearson-correlation relations between the models' predictions;
- divergence ``pearson`` (:class:`PearsonDistance`): the inter-class relation
  of one row, ``1 - rho(p, q)``, usable by any divergence-pluggable loss.

This package is the one ``docs/tutorial.md`` builds step by step.
"""

from kdcore_dist.correlation import PearsonDistance, pearson
from kdcore_dist.loss import DIST

__all__ = ["DIST", "PearsonDistance", "pearson"]
