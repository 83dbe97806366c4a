"""kdcore-ptloss: PTLoss, the perturbed distillation loss of Zhang et al.,
"Do Not Blindly Imitate the Teacher: Using Perturbed Loss for Knowledge
Distillation" (the PTLoss paper).

- loss ``ptloss`` (eq. 7) and transform ``ptloss_proxy`` (sec. 4.2);
- :func:`proxy_teacher`: the proxy teacher of a set of coefficients;
- :func:`search`: the coefficient search of alg. 1 scored by eq. 11, also
  the ``kdcore ptloss-search`` command.
"""

__version__ = "0.1.0"

from kdcore_ptloss.loss import PTLoss
from kdcore_ptloss.proxy import ProxyTeacher, proxy_teacher
from kdcore_ptloss.search import Draw, SearchResult, quality_scores, search

__all__ = ["__version__", "PTLoss", "ProxyTeacher", "proxy_teacher", "search", "SearchResult", "Draw",
           "quality_scores"]
