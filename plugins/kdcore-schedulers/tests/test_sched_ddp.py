"""Two gloo processes (torch.multiprocessing.spawn): with GradientContext.reduce an
all-reduce mean, both ranks apply identical weights and updates, equal to those
computed from the rank-averaged gradients."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdcore_schedulers import crossbatch_update

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def mean_grads(worker, world):
    """The rank-averaged gradients of the CE and KD terms and of the auxiliary CE term."""
    student, teacher = worker.make_model()
    params = list(student.parameters())
    sums = None
    for rank in range(world):
        (x, y), (xa, ya) = worker.rank_data(rank)
        main, aux = worker.term_losses(student, teacher, x, y), worker.term_losses(student, teacher, xa, ya)
        grads = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
                 for loss in (main["ce"], main["kd"], aux["ce"])]
        sums = grads if sums is None else [a + b for a, b in zip(sums, grads)]
    return [s / world for s in sums]


def test_two_ranks_apply_identical_weights(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import sched_ddp_worker as worker

    out = tmp_path / "result"
    mp.spawn(worker.run, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}") for r in range(2))
    assert r0.keys() == r1.keys() and len(r0) == len(worker.SCHEDULERS)
    for key in r0:
        (g0, info0), (g1, info1) = r0[key], r1[key]
        assert info0 == info1, key                 # bit-identical weights, lambda, cosines
        assert torch.equal(g0, g1), key

    g_ce, g_kd, g_ref = mean_grads(worker, 2)
    for mode in ("paper", "align"):
        g, info = crossbatch_update(g_ce, g_kd, g_ref, mode=mode)
        g_rank, info_rank = r0["crossbatch" + str({} if mode == "paper" else {"mode": "align"})]
        assert info_rank["w_kd"] == pytest.approx(info["w_kd"], rel=1e-4)
        assert info_rank["lam"] == pytest.approx(info["lam"], rel=1e-4)
        torch.testing.assert_close(g_rank, g, rtol=1e-4, atol=1e-6)
