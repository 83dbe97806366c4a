"""Worker of test_sched_ddp.py (a plain module so that spawned processes can import it)."""

import os

import torch
import torch.distributed as dist
from torch import nn

import kdcore
from kdcore.losses.schedule import Progress
from kdcore.losses.weighting import GradientContext

SCHEDULERS = [("crossbatch", {}), ("crossbatch", {"mode": "align"}), ("mgda", {}), ("pcgrad", {"seed": 0})]


def make_model():
    torch.manual_seed(0)  # the same student and teacher on every rank
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), nn.Linear(5, 3)


def rank_data(rank):
    g = torch.Generator().manual_seed(100 + rank)  # a different shard on each rank
    return [(torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)) for _ in range(2)]


def term_losses(student, teacher, x, y):
    s, t = student(x), teacher(x).detach()
    return {"ce": kdcore.create("loss", "ce")(s, t, y), "kd": 0.5 * kdcore.create("loss", "kd")(s, t, y)}


def run(rank, world, init_file, out_file):
    os.environ["KDCORE_PLUGINS"] = "schedulers"  # this process needs no other plugin: faster start
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        student, teacher = make_model()
        (x, y), (xa, ya) = rank_data(rank)

        def mean(t):
            t = t.clone()
            dist.all_reduce(t)
            return t / world

        results = {}
        for name, kw in SCHEDULERS:
            ctx = GradientContext(term_losses(student, teacher, x, y), {"ce": "ce", "kd": "kd"},
                                  list(student.parameters()), Progress(1, 0, 1, 1),
                                  lambda names=None: term_losses(student, teacher, xa, ya), mean)
            update = kdcore.create("scheduler", name, **kw).combine(ctx)
            results[f"{name}{kw}"] = (update.grad, dict(update.info))
        torch.save(results, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()
