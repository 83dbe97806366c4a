"""The optimizer and its learning-rate schedule (``[optim]``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from kdcore.config import OptimConfig, RunConfig


def build_optimizer(o: OptimConfig, params: Sequence[nn.Parameter],
                    term_params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD or AdamW over the student's parameters and, as a second group, the loss terms'."""
    groups = [{"params": list(params)}]
    if term_params:
        groups.append({"params": list(term_params)})  # the loss terms' connectors
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def lr_factor(o: OptimConfig, run: RunConfig, epoch: int, step: int) -> float:
    """Learning-rate multiplier for ``epoch`` (from 1) at optimizer step ``step``
    (steps before this one): the schedule (over steps under ``run.max_steps``)
    times the linear warm-up of ``optim.warmup_steps``."""
    factor = 1.0
    if o.lr_schedule == "step":
        factor = o.gamma ** sum(epoch > m for m in o.milestones)
    elif o.lr_schedule == "cosine":
        floor = o.min_lr / o.lr
        done = step / run.max_steps if run.max_steps else (epoch - 1) / run.epochs
        factor = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done))
    if o.warmup_steps and step < o.warmup_steps:
        factor *= (step + 1) / o.warmup_steps
    return factor
