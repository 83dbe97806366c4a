"""Dot products and norms of flat gradient vectors, safe over the whole float range.

The fast path is one fused reduction per quantity in the vectors' dtype
(float32 at least). Where its result could have overflowed or lost its digits
to underflow (a squared norm beyond the dtype's range or below
``n * tiny / eps``), the vectors are scaled by their largest ``|entry|`` first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def work_dtype(v: Tensor) -> torch.dtype:
    """The dtype reductions run in: the vector's, at least float32."""
    return torch.promote_types(v.dtype, torch.float32)


def max_abs(v: Tensor) -> float:
    """``max_i |v_i|`` in one pass without a temporary (0 for an empty vector)."""
    if not v.numel():
        return 0.0
    lo, hi = torch.aminmax(v)
    return max(-float(lo), float(hi))


def _trusted(square: float, v: Tensor) -> bool:
    """Whether a fast-path squared norm is free of overflow and underflow."""
    fi = torch.finfo(work_dtype(v))
    return math.isfinite(square) and square >= v.numel() * fi.tiny / fi.eps


def gram_matrix(vectors: Sequence[Tensor]) -> list[list[float]]:
    """``K[i][j] = v_i . v_j`` as Python floats (one device sync)."""
    vs = [v.reshape(-1).to(work_dtype(v)) for v in vectors]
    k = len(vs)
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    vals = torch.stack([torch.dot(vs[i], vs[j]) for i, j in pairs]).tolist()
    scales = [1.0] * k
    if not all(_trusted(vals[pairs.index((i, i))], vs[i]) for i in range(k)) \
            or not all(map(math.isfinite, vals)):
        scales = [max_abs(v) or 1.0 for v in vs]
        vs = [v / s for v, s in zip(vs, scales)]
        vals = torch.stack([torch.dot(vs[i], vs[j]) for i, j in pairs]).tolist()
    out = [[0.0] * k for _ in range(k)]
    for (i, j), x in zip(pairs, vals):
        out[i][j] = out[j][i] = x * scales[i] * scales[j]
    return out


def vector_norm(v: Tensor) -> float:
    """``|v|`` as a Python float."""
    v = v.reshape(-1).to(work_dtype(v))
    n = float(torch.linalg.vector_norm(v))
    if _trusted(n * n, v):
        return n
    s = max_abs(v)
    return s * float(torch.linalg.vector_norm(v / s)) if s > 0 else 0.0


def fits(dtype: torch.dtype, *values: float) -> bool:
    """Whether the scalars (coefficients, or bounds on a result's entries) stay
    well inside the dtype's range."""
    big = torch.finfo(work_dtype(torch.empty(0, dtype=dtype))).max / 4
    return all(abs(x) < big for x in values)
