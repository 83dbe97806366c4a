"""Language-model metrics against the truth and between models.

:func:`evaluate_lm` runs a model (any kdcore backbone: it may return logits or
:class:`kdcore.Outputs`) over a split in order and reports, over the kept
positions (target not ``-100``):

- ``kl_to_truth``: mean ``KL(p* || q)`` per token, where the split carries the
  exact next-token law ``posterior`` ``[n, T, V]`` (``synthetic_lm``);
- ``nll`` and ``ppl``: cross-entropy with the targets and its exponential;
- ``acc``: top-1 accuracy;
- ``agreement``: top-1 agreement with a ``teacher`` model, when one is given;
- ``teacher_kl``: mean ``KL(p_teacher || q)`` per token, when a teacher is given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from kdcore.data import TensorSplit, index_inputs
from kdcore.losses.outputs import Outputs

IGNORE_INDEX = -100


def _logits(model: nn.Module, inputs) -> Tensor:
    raw = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return Outputs.of(raw).logits.float()


def _kl_rows(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """``sum_k p_k (log p_k - log q_k)`` per row, 0 where ``p_k = 0`` (also against ``-inf``)."""
    p = p_logp.exp()
    diff = torch.where(p > 0, p_logp - q_logp, torch.zeros_like(p))
    return (p * diff).sum(-1)


@torch.no_grad()
def evaluate_lm(model: nn.Module, split: TensorSplit, teacher: nn.Module | None = None, *,
                batch_size: int = 64, device: str | torch.device = "cpu") -> dict[str, float]:
    """The metrics of the module docstring (means over kept positions)."""
    device = torch.device(device)
    states = [(m, m.training) for m in (model, teacher) if m is not None]
    for m, _ in states:
        m.eval()
    sums = torch.zeros(6, dtype=torch.float64)  # n, nll, correct, kl_truth, agree, kl_teacher
    post = getattr(split, "posterior", None)
    try:
        for start in range(0, len(split), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(split)))
            inputs = index_inputs(split.inputs, idx)
            inputs = {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, Mapping) \
                else inputs.to(device)
            target = split.targets[idx].to(device)
            keep = target != IGNORE_INDEX
            logp = torch.log_softmax(_logits(model, inputs), -1)
            kept_logp = logp[keep]
            sums[0] += keep.sum()
            sums[1] += -kept_logp.gather(-1, target[keep].unsqueeze(-1)).sum()
            sums[2] += (kept_logp.argmax(-1) == target[keep]).sum()
            if post is not None:
                truth = post[idx].to(device).double()[keep]
                sums[3] += _kl_rows(truth.clamp(min=0).log(), kept_logp.double()).sum()
            if teacher is not None:
                t_logp = torch.log_softmax(_logits(teacher, inputs), -1)[keep]
                sums[4] += (t_logp.argmax(-1) == kept_logp.argmax(-1)).sum()
                sums[5] += _kl_rows(t_logp.double(), kept_logp.double()).sum()
    finally:
        for m, was in states:
            m.train(was)
    n = max(float(sums[0]), 1.0)
    out = {"nll": float(sums[1]) / n, "acc": float(sums[2]) / n}
    out["ppl"] = math.exp(min(out["nll"], 700.0))
    if post is not None:
        out["kl_to_truth"] = float(sums[3]) / n
    if teacher is not None:
        out["agreement"] = float(sums[4]) / n
        out["teacher_kl"] = float(sums[5]) / n
    return out


def kl_to_truth(model: nn.Module, split: TensorSplit, **kwargs) -> float:
    """Mean per-token ``KL(p* || q_model)`` over a split that carries the exact law
    (``synthetic_lm``'s val and test splits)."""
    if getattr(split, "posterior", None) is None:
        raise ValueError("kl_to_truth: the split carries no exact next-token law ('posterior')")
    return evaluate_lm(model, split, **kwargs)["kl_to_truth"]
