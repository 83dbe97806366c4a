"""Evaluation: accuracy, NLL (and perplexity on sequences), distances to the true
distribution where the data know it, and top-1 agreement with the teacher."""

from __future__ import annotations

import math

import torch
from torch import nn

from kdcore.engine.batches import eval_batches
from kdcore.engine.forward import forward
from kdcore.engine.runtime import Runtime
from kdcore.losses.functional import IGNORE_INDEX


@torch.no_grad()
def evaluate(model: nn.Module, split, prefix: str, runtime: Runtime, *, batch_size: int, num_workers: int = 0,
             teacher: nn.Module | None = None) -> dict[str, float]:
    """Accuracy and mean negative log-likelihood of ``model`` over the kept positions of
    ``split`` (token-level for sequences, with the perplexity ``exp(nll)``), the distances
    to the Bayes posterior where the data know it, and, given a ``teacher``, the top-1
    agreement with it; keys ``{prefix}_acc``, ``{prefix}_nll``, ... (summed over ranks)."""
    if split is None:
        return {}
    was_training = model.training
    model.eval()
    device = runtime.device
    sums = torch.zeros(7, dtype=torch.float64, device=device)  # correct, n, tv, l2, kl, nll, agree
    has_post = getattr(split, "posterior", None) is not None
    sequences = False
    for batch, post in eval_batches(split, batch_size, device, runtime.dist.rank, runtime.dist.world, num_workers):
        with runtime.autocast():
            inputs = runtime.inputs(batch.inputs)
            logits = forward(model, inputs, model, (), batch.index).logits
            if teacher is not None:
                taught = forward(teacher, inputs, teacher, (), batch.index).logits
        keep = batch.target != IGNORE_INDEX
        sequences = batch.target.dim() > 1
        top = logits.argmax(-1)
        sums[0] += ((top == batch.target) & keep).sum()
        sums[1] += keep.sum()
        logq = torch.log_softmax(logits.float(), -1)
        picked = logq.gather(-1, batch.target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums[5] -= torch.where(keep, picked, 0.0).sum()
        if teacher is not None:
            sums[6] += ((taught.argmax(-1) == top) & keep).sum()
        if post is not None:  # distances to the true distribution over the kept positions
            diff = logq.exp() - post
            kl = torch.where(post > 0, post * (post.clamp(min=1e-30).log() - logq), 0.0).sum(-1)
            sums[2] += torch.where(keep, 0.5 * diff.abs().sum(-1), 0.0).sum()
            sums[3] += torch.where(keep, diff.norm(dim=-1), 0.0).sum()
            sums[4] += torch.where(keep, kl, 0.0).sum()
    model.train(was_training)
    runtime.dist.sum_(sums)
    n = max(sums[1].item(), 1)
    out = {f"{prefix}_acc": sums[0].item() / n, f"{prefix}_nll": sums[5].item() / n}
    if sequences:
        out[f"{prefix}_ppl"] = math.exp(min(out[f"{prefix}_nll"], 700.0))
    if teacher is not None:
        out[f"{prefix}_agreement"] = sums[6].item() / n
    if has_post:
        out[f"{prefix}_tv"] = sums[2].item() / n
        out[f"{prefix}_l2"] = sums[3].item() / n
        out[f"{prefix}_kl"] = sums[4].item() / n  # KL(truth || model)
    return out
