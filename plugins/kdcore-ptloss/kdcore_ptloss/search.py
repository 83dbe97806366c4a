"""Automated selection of the PTLoss coefficients (PTLoss paper alg. 1, eq. 11).

For every order ``M = 1..orders``, ``draws`` coefficient sets are drawn
uniformly from ``space^M`` (or ``space^(C x M)`` with ``per_class``); each is
scored by the quality of its proxy teacher on a validation set of teacher
outputs and labels (eq. 11),

    Q = (mean_n ||p_px(x_n) - y_n||_2)^2 + mean_n (p_px(x_n) . log p_px(x_n))^2,

and the set with the lowest ``Q`` wins. All ``orders x draws x samples``
proxy teachers are solved together by the batched Newton solver of
:mod:`kdcore_ptloss.proxy`.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
from torch import Tensor

from kdcore.common.errors import ConfigError
from kdcore.losses.functional import IGNORE_INDEX
from kdcore_ptloss.proxy import solve

#: the draws of one solver call hold at most this many entries (draws x samples x classes)
GROUP = 1 << 23


class _Mapping:
    """Key access (``obj["score"]``) next to attribute access."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in attrs.fields(type(self))]


@attrs.frozen
class Draw(_Mapping):
    """One scored coefficient set: its order ``M``, ``eps`` (a list of ``M``
    floats or a ``C x M`` table), its eq. 11 score and the fraction of
    samples whose proxy solve converged."""

    order: int
    eps: list
    score: float
    converged: float = 1.0


@attrs.frozen
class SearchResult(_Mapping):
    """The outcome of :func:`search`: the best ``eps`` and ``order``, its
    ``score`` (eq. 11), every draw in ``scores``, and ``teacher_score``, the
    score of the unperturbed teacher (``eps = 0``) for reference."""

    eps: list
    score: float
    order: int
    scores: list[Draw]
    teacher_score: float

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        out = attrs.asdict(self, recurse=False)
        out["scores"] = [attrs.asdict(d) for d in self.scores]
        return out


def quality_scores(proxy_logp: Tensor, labels: Tensor) -> Tensor:
    """Eq. 11 for a stack of proxy teachers ``[..., N, C]`` and labels ``[N]``:
    ``(mean_n ||p - y_n||_2)^2 + mean_n (sum_c p_c log p_c)^2`` per leading index."""
    p = proxy_logp.exp()
    onehot = torch.nn.functional.one_hot(labels, p.shape[-1]).to(p.dtype)
    distance = (p - onehot).square().sum(-1).sqrt().mean(-1)
    neg_entropy = torch.where(p > 0, p * proxy_logp, torch.zeros_like(p)).sum(-1)
    return distance.square() + neg_entropy.square().mean(-1)


def _check(teacher_logits: Tensor, labels: Tensor, orders: Any, draws: Any, space: Any,
           seed: Any) -> tuple[Tensor, Tensor, float, float]:
    for name, value in (("orders", orders), ("draws", draws)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed: must be an integer, got {seed!r}")
    try:
        lo, hi = (float(v) for v in space)
    except (TypeError, ValueError):
        raise ConfigError(f"space: must be a pair (low, high), got {space!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ConfigError(f"space: must be finite with low <= high, got {space!r}")
    logits, labels = torch.as_tensor(teacher_logits), torch.as_tensor(labels)
    if logits.dim() < 2 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ConfigError(f"teacher logits {tuple(logits.shape)} and labels {tuple(labels.shape)}: "
                          "expected [N, C] and [N] (or [B, T, C] and [B, T])")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ConfigError(f"labels: must be integer class indices, got dtype {labels.dtype}")
    c = logits.shape[-1]
    logits, labels = logits.reshape(-1, c), labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    logits, labels = logits[keep], labels[keep].long()
    if labels.numel() == 0:
        raise ConfigError("labels: no labelled samples (all are -100)")
    if labels.min() < 0 or labels.max() >= c:
        raise ConfigError(f"labels: class indices must be in [0, {c}) or -100")
    logp = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=-1)
    if torch.isnan(logp).any():
        raise ConfigError("teacher logits: contain NaN (or rows without any finite logit)")
    return logp, labels.cpu(), lo, hi


def search(teacher_logits: Tensor, labels: Tensor, *, orders: int = 5, draws: int = 100,
           space: tuple[float, float] = (-1.0, 10.0), per_class: bool = False, seed: int = 0,
           progress: bool | None = None) -> SearchResult:
    """Random search of PTLoss coefficients (PTLoss paper alg. 1) scored by eq. 11.

    - ``teacher_logits``: ``[N, C]`` (or ``[B, T, C]``) teacher logits on a
      validation set; ``labels``: ``[N]`` (``[B, T]``), ``-100`` ignored.
    - ``orders``: the largest order ``N_M``; ``draws``: draws per order ``N_k``;
      ``space``: the interval each coefficient is drawn from (paper: [-1, 10]);
      ``per_class``: draw a ``C x M`` table instead of ``M`` shared values;
      ``seed``: the random generator's seed.
    - ``progress``: show a progress bar (default: only on a terminal).

    Draws of order ``M`` are ``eps`` tables with zeros beyond ``M``, so every
    draw of every order is solved in the same batched Newton solve.
    """
    from tqdm.auto import tqdm

    logp, labels, lo, hi = _check(teacher_logits, labels, orders, draws, space, seed)
    n, c = logp.shape
    gen = torch.Generator().manual_seed(seed)
    tables, order_of = [], []
    for m in range(1, orders + 1):
        shape = (draws, c, m) if per_class else (draws, 1, m)
        drawn = lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)
        tables.append(torch.nn.functional.pad(drawn.expand(draws, c, m), (0, orders - m)))
        order_of += [m] * draws
    eps = torch.cat(tables)                                    # [D, C, orders]
    total = eps.shape[0]
    group = max(1, GROUP // (n * c))
    scores, converged = torch.empty(total, dtype=torch.float64), torch.empty(total, dtype=torch.float64)
    with tqdm(total=total * n, unit="row", desc="ptloss-search", disable=None if progress is None
              else not progress, leave=False) as bar:
        for start in range(0, total, group):
            part = eps[start:start + group]
            k = part.shape[0]
            rows = logp.repeat(k, 1)
            draw = torch.arange(k).repeat_interleave(n)
            proxy, info = solve(rows, part, draw, progress=bar.update)
            scores[start:start + k] = quality_scores(proxy.view(k, n, c), labels)
            converged[start:start + k] = info.converged.view(k, n).double().mean(-1)
    results = []
    for i in range(total):
        m = order_of[i]
        coef = eps[i, :, :m]
        results.append(Draw(order=m, eps=coef.tolist() if per_class else coef[0].tolist(),
                            score=float(scores[i]), converged=float(converged[i])))
    best = min(range(total), key=lambda i: (scores[i].item(), i))
    teacher = float(quality_scores(logp, labels))
    return SearchResult(eps=results[best].eps, score=results[best].score, order=results[best].order,
                        scores=results, teacher_score=teacher)
