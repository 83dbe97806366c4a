"""Evaluation: accuracy, NLL (and perplexity on sequences), distances to the true
distribution where the data know it, and top-1 agreement with a teacher, given as
its top-1 predictions (:func:`evaluate_top1` returns a model's, in the order of this
rank's evaluation batches; the teacher-evaluation cache keeps them)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from kdcore.engine.batches import eval_batches
from kdcore.engine.forward import forward
from kdcore.engine.runtime import Runtime
from kdcore.losses.functional import IGNORE_INDEX


def evaluate(model: nn.Module, split, prefix: str, runtime: Runtime, *, batch_size: int, num_workers: int = 0,
             references: Mapping[str, Tensor] | None = None) -> dict[str, float]:
    """Accuracy and mean negative log-likelihood of ``model`` over the kept positions of
    ``split`` (token-level for sequences, with the perplexity ``exp(nll)``) and the distances
    to the Bayes posterior where the data know it; keys ``{prefix}_acc``, ``{prefix}_nll``,
    ... (summed over ranks). ``references`` maps a result key to another model's (a
    teacher's) :func:`evaluate_top1` predictions on the same split and batch size: the key
    gets the top-1 agreement with them."""
    return _evaluate(model, split, prefix, runtime, batch_size, num_workers, references or {}, False, None)[0]


def evaluate_top1(model: nn.Module, split, prefix: str, runtime: Runtime, *, batch_size: int,
                  num_workers: int = 0, classes: int | None = None) -> tuple[dict[str, float], Tensor | None]:
    """:func:`evaluate` of ``model`` and its top-1 prediction at every position this rank
    evaluates (flat, int32, on the CPU): what an agreement with ``model`` is computed from
    later without running it again (the teacher-evaluation cache). ``({}, None)`` where
    ``classes`` is given and the model's logits have another width (a teacher over its
    own vocabulary, whose predictions the data's labels cannot score)."""
    return _evaluate(model, split, prefix, runtime, batch_size, num_workers, {}, True, classes)


@torch.no_grad()
def _evaluate(model: nn.Module, split, prefix: str, runtime: Runtime, batch_size: int, num_workers: int,
              references: Mapping[str, Tensor],
              collect: bool, classes: int | None) -> tuple[dict[str, float], Tensor | None]:
    """The pass of :func:`evaluate` and :func:`evaluate_top1`. Positions a model's
    :class:`kdcore.Outputs` mark as unknown (``known`` False) are not scored."""
    if split is None:
        return {}, None
    was_training = model.training
    model.eval()
    device = runtime.device
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # correct, n, tv, l2, kl, nll
    has_post = getattr(split, "posterior", None) is not None
    sequences = False
    agree = torch.zeros(len(references), dtype=torch.float64, device=device)
    tops: list[Tensor] = []
    done = 0  # positions evaluated so far (where this batch's reference predictions start)
    for batch, post in eval_batches(split, batch_size, device, runtime.dist.rank, runtime.dist.world, num_workers):
        with runtime.autocast():
            inputs = runtime.inputs(batch.inputs)
            outputs = forward(model, inputs, model, (), batch.index)
            logits = outputs.logits
        if classes is not None and logits.shape[-1] != classes:  # another vocabulary: not comparable
            model.train(was_training)
            return {}, None
        keep = batch.target != IGNORE_INDEX
        if outputs.known is not None:  # a model that knows only some positions is scored on those
            keep &= outputs.known.to(keep.device)
        sequences = batch.target.dim() > 1
        top = logits.argmax(-1)
        sums[0] += ((top == batch.target) & keep).sum()
        sums[1] += keep.sum()
        logq = torch.log_softmax(logits.float(), -1)
        picked = logq.gather(-1, batch.target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums[5] -= torch.where(keep, picked, 0.0).sum()
        for j, ref in enumerate(references.values()):
            theirs = ref[done:done + top.numel()].to(device).view(top.shape)
            agree[j] += ((theirs == top) & keep).sum()
        done += top.numel()
        if collect:
            tops.append(top.reshape(-1).to(torch.int32).cpu())
        if post is not None:  # distances to the true distribution over the kept positions
            diff = logq.exp() - post
            kl = torch.where(post > 0, post * (post.clamp(min=1e-30).log() - logq), 0.0).sum(-1)
            sums[2] += torch.where(keep, 0.5 * diff.abs().sum(-1), 0.0).sum()
            sums[3] += torch.where(keep, diff.norm(dim=-1), 0.0).sum()
            sums[4] += torch.where(keep, kl, 0.0).sum()
    model.train(was_training)
    runtime.dist.sum_(sums)
    if references:
        runtime.dist.sum_(agree)
    n = max(sums[1].item(), 1)
    out = {f"{prefix}_acc": sums[0].item() / n, f"{prefix}_nll": sums[5].item() / n}
    if sequences:
        out[f"{prefix}_ppl"] = math.exp(min(out[f"{prefix}_nll"], 700.0))
    out.update({key: agree[j].item() / n for j, key in enumerate(references)})
    if has_post:
        out[f"{prefix}_tv"] = sums[2].item() / n
        out[f"{prefix}_l2"] = sums[3].item() / n
        out[f"{prefix}_kl"] = sums[4].item() / n  # KL(truth || model)
    if not collect:
        return out, None
    return out, torch.cat(tops) if tops else torch.zeros(0, dtype=torch.int32)
