"""Next-token sampling with temperature and top-p (nucleus) from an explicit generator.

``p = softmax(logits / temperature)``; top-p keeps the most probable tokens, in
order of decreasing probability (ties by token id), up to and including the
first one at which their cumulative probability reaches ``top_p`` (Holtzman et
al. 2020, "The Curious Case of Neural Text Degeneration", eq. 2-3), and
renormalises them. The token is drawn by inverse CDF from one uniform number
per row, ``u ~ U[0, 1)`` from the caller's :class:`torch.Generator`, so a
fixed generator gives fixed tokens on any machine of the same device type.
``temperature = 0`` is greedy decoding (the argmax; no number is drawn).
Columns at ``-inf`` (padding past the vocabulary) are never drawn.
"""

from __future__ import annotations

import torch
from torch import Tensor


def nucleus_probs(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """The sampling law ``[B, V]`` (float32) of ``logits`` ``[B, V]`` after temperature and top-p."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the tokens ranked above each one
    sorted_p = torch.where(before < top_p, sorted_p, 0.0)  # the first token is always kept
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def sample_next(logits: Tensor, generator: torch.Generator | None, *, temperature: float = 1.0,
                top_p: float = 1.0) -> Tensor:
    """One token per row ``[B]`` (int64) from ``logits`` ``[B, V]``."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = nucleus_probs(logits, temperature, top_p)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    cdf = torch.cumsum(probs.double(), dim=-1)
    cdf = cdf / cdf[:, -1:]  # exactly 1 at the end: u < 1 always finds a token
    token = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return token.clamp_(max=probs.shape[-1] - 1)
