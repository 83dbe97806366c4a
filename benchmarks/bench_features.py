"""Forward + backward time of kdcore-features' losses against hand-written PyTorch.

On the stage features of resnet32x4 (teacher) -> resnet8x4 (student) at 32x32 input
(stages 64x32x32, 128x16x16, 256x8x8 on both sides; the pooled feature is the last
stage averaged), batch 64, times ``loss(student_outputs, teacher_outputs, y).backward()``
of each registered loss (connectors materialised first) and of a plain PyTorch
formula of the same method written the way one usually writes it (mdistiller-style
functions), using the *same* connector modules, in the same run, interleaved
(alternating which goes first), and prints the fastest times, the ratio kdcore / plain
of the fastest and of the median runs (goal <= 1.05) and the difference of the values.

    .venv/bin/python benchmarks/bench_features.py [--losses fitnet,at,...] [--reps 7] [--threads N]

With ``--step``: whole training steps on the real zoo models instead (resnet8x4
student, resnet32x4 teacher, batch 64 of 32x32 inputs): a feature method's step
(teacher forward under no_grad and student forward, both with the method's taps,
``ce`` + the feature loss with its connectors, backward) against plain KD's step
on the same models (the same forwards without taps, ``ce`` + ``kd`` at T = 4,
backward), interleaved; the ratio feature / KD of the fastest and of the median
steps, in process CPU time (one thread: less disturbed by other jobs on a shared
machine than wall time). ``uskd`` has no teacher: its step runs the student only.

    .venv/bin/python benchmarks/bench_features.py --step [--losses ...] [--reps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import kdcore
from kdcore.engine.taps import Tapping

N = 64
STAGES = {"stages.0": (64, 32, 32), "stages.1": (128, 16, 16), "stages.2": (256, 8, 8)}


def plain_fitnet(L, fs, ft, y, z):
    return F.mse_loss(L.regressors[0](fs["stages.1"]), ft["stages.1"])


def plain_at(L, fs, ft, y, z):
    def a(f):
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))
    return sum((a(fs[k]) - a(ft[k])).pow(2).mean() for k in STAGES)


def plain_sp(L, fs, ft, y, z):
    s, t = fs["stages.2"].view(N, -1), ft["stages.2"].view(N, -1)
    gs, gt = F.normalize(s @ s.t()), F.normalize(t @ t.t())
    return (gt - gs).pow(2).sum() / (N * N)


def plain_pkt(L, fs, ft, y, z, eps=1e-7):
    s, t = fs["stages.2"].mean((2, 3)), ft["stages.2"].mean((2, 3))
    s = s / (s.norm(dim=1, keepdim=True) + eps)
    t = t / (t.norm(dim=1, keepdim=True) + eps)
    ms, mt = (s @ s.t() + 1) / 2, (t @ t.t() + 1) / 2
    ms, mt = ms / ms.sum(1, keepdim=True), mt / mt.sum(1, keepdim=True)
    return (mt * torch.log((mt + eps) / (ms + eps))).mean()


def _pdist(e, eps=1e-12):
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None] - 2 * e @ e.t()).clamp(min=eps).sqrt().clone()
    d[range(len(e)), range(len(e))] = 0
    return d


def plain_relational(L, fs, ft, y, z):
    s, t = fs["stages.2"].mean((2, 3)), ft["stages.2"].mean((2, 3))
    with torch.no_grad():
        td = _pdist(t)
        td = td / td[td > 0].mean()
        nt = F.normalize(t[None] - t[:, None], p=2, dim=2)
        ta = torch.bmm(nt, nt.transpose(1, 2)).view(-1)
    d = _pdist(s)
    d = d / d[d > 0].mean()
    ns = F.normalize(s[None] - s[:, None], p=2, dim=2)
    sa = torch.bmm(ns, ns.transpose(1, 2)).view(-1)
    return 25 * F.smooth_l1_loss(d, td) + 50 * F.smooth_l1_loss(sa, ta)


def plain_vid(L, fs, ft, y, z):
    total = 0
    for reg, ls, k in zip(L.regressors, L.log_scales, STAGES):
        mu = reg(fs[k])
        var = (F.softplus(ls) + 1e-5).view(1, -1, 1, 1)
        total = total + (0.5 * ((mu - ft[k]) ** 2 / var + torch.log(var))).mean()
    return total


def plain_crd(L, fs, ft, y, z):
    s, t = fs["stages.2"].mean((2, 3)), ft["stages.2"].mean((2, 3))
    vs, vt = F.normalize(L.embed_student(s)), F.normalize(L.embed_teacher(t))
    idx = torch.cat([z[:, None], torch.randint(L.num_data, (N, L.num_negatives))], 1)
    out_s = torch.exp(torch.bmm(L.memory_teacher[idx], vs[:, :, None]) / L.temperature).squeeze(2)
    out_t = torch.exp(torch.bmm(L.memory_student[idx], vt[:, :, None]) / L.temperature).squeeze(2)
    out_s, out_t = out_s / L.normaliser[0], out_t / L.normaliser[1]

    def nce(x):
        m, pn = x.size(1) - 1, 1.0 / L.num_data
        d1 = torch.log(x[:, 0] / (x[:, 0] + m * pn + 1e-7))
        d0 = torch.log((m * pn) / (x[:, 1:] + m * pn + 1e-7))
        return -(d1.sum() + d0.sum()) / x.size(0)

    loss = nce(out_s) + nce(out_t)
    with torch.no_grad():
        for bank, v in ((L.memory_student, vs), (L.memory_teacher, vt)):
            bank.index_copy_(0, z, F.normalize(bank[z] * 0.5 + v * 0.5))
    return loss


def plain_reviewkd(L, fs, ft, y, z):
    xs = [fs[k] for k in STAGES] + [fs["stages.2"].mean((2, 3), keepdim=True)]
    xt = [ft[k] for k in STAGES] + [ft["stages.2"].mean((2, 3), keepdim=True)]
    results, res = [None] * 4, None
    for i in reversed(range(4)):
        results[i], res = L.abfs[i](xs[i], res, tuple(xt[i].shape[-2:]))
    total = 0
    for a, b in zip(results, xt):
        loss, cnt, tot = F.mse_loss(a, b), 1.0, 1.0
        for lv in (4, 2, 1):
            if lv >= a.shape[2]:
                continue
            cnt /= 2
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(a, lv), F.adaptive_avg_pool2d(b, lv)) * cnt
            tot += cnt
        total = total + loss / tot
    return total


def plain_uskd(L, fs, ft, y, logits):
    n, c = logits.shape
    lab = y[:, None]
    s = F.softmax(logits, 1)
    st = s.gather(1, lab)
    pt = (st ** 2 + 1 - (st ** 2).mean(0, True)).detach()
    ls = F.log_softmax(logits, 1)
    loss_t = -(pt * ls.gather(1, lab)).sum(1).mean()
    w = L.fc(fs["stages.1"].mean((2, 3)))
    target = torch.zeros_like(logits).scatter_(1, lab, 0.9) + 0.1 / c
    loss_weak = -(0.1 * target * F.log_softmax(w, 1)).sum(1).mean()
    wi = F.softmax(w, 1)
    rank = wi / (1 - wi.gather(1, lab) + 1e-6) + s / (1 - st + 1e-6)
    _, order = torch.sort(rank, descending=True, dim=-1)
    zipf = (1 / torch.arange(1, c + 1, dtype=logits.dtype)).repeat(n, 1).gather(1, torch.argsort(order))
    mask = torch.ones_like(logits).scatter_(1, lab, 0).bool()
    ns = F.log_softmax(logits[mask].reshape(n, -1), 1)
    nz = zipf[mask].reshape(n, -1)
    nz = (nz / nz.sum(1, keepdim=True)).detach()
    return 0.1 * loss_t + 0.1 * -(nz * ns).sum(1).mean() + loss_weak


PLAIN = {k[6:]: v for k, v in globals().items() if k.startswith("plain_")}
TAPS = {"fitnet": ["stages.1"], "at": list(STAGES), "sp": ["stages.2"], "pkt": ["stages.2"],
        "relational": ["stages.2"], "vid": list(STAGES), "crd": ["stages.2"],
        "reviewkd": [*STAGES, "stages.2"], "uskd": ["stages.1"]}


def interleaved(run_a, run_b, reps: int, clock=time.perf_counter) -> tuple[list[float], list[float]]:
    """``reps`` timed calls of each, alternating which goes first."""
    a, b = [], []
    for i in range(reps):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = clock()
            (run_a if which == 0 else run_b)()
            (a if which == 0 else b).append(clock() - start)
    return a, b


def step_main(args) -> int:
    """Whole training steps: each feature method against plain KD (module docstring)."""
    torch.manual_seed(0)
    student = kdcore.create("backbone", "resnet8x4", num_classes=100)
    teacher = kdcore.create("backbone", "resnet32x4", num_classes=100).eval().requires_grad_(False)
    x, y, index = torch.randn(N, 3, 32, 32), torch.randint(100, (N,)), torch.randperm(50000)[:N]
    ce, kd = kdcore.create("loss", "ce"), kdcore.create("loss", "kd", temperature=4.0)

    def kd_step():
        student.zero_grad(set_to_none=True)
        with torch.no_grad():
            zt = teacher(x)
        zs = student(x)
        (ce(zs, None, y) + kd(zs, zt)).backward()

    print(f"training step, resnet32x4 -> resnet8x4, batch {N}, {torch.get_num_threads()} threads, "
          f"{args.reps} interleaved steps each")
    print(f"{'method':11} {'method cpu ms':>14} {'kd cpu ms':>10} {'ratio':>6} {'median':>7}")
    for name in args.losses.split(","):
        loss = kdcore.create("loss", name, **({"num_data": 50000} if name == "crd" else {}))
        loss.bind(student, teacher if loss.uses_teacher else None)

        def feature_step():
            student.zero_grad(set_to_none=True)
            loss.zero_grad(set_to_none=True)
            to = None
            if loss.uses_teacher:
                with torch.no_grad(), Tapping(teacher, loss.teacher_taps) as ft:
                    to = kdcore.Outputs(teacher(x), features=ft, index=index)
            with Tapping(student, loss.student_taps) as fs:
                zs = student(x)
            (ce(zs, None, y) + loss(kdcore.Outputs(zs, features=fs, index=index), to, y)).backward()

        feature_step()  # materialise the connectors
        kd_step()
        a, b = interleaved(feature_step, kd_step, args.reps, time.process_time)
        print(f"{name:11} {min(a) * 1e3:14.1f} {min(b) * 1e3:10.1f} {min(a) / min(b):6.2f} "
              f"{statistics.median(a) / statistics.median(b):7.2f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--losses", default=",".join(PLAIN))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--step", action="store_true", help="whole training steps against plain KD's")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step:
        return step_main(args)
    torch.manual_seed(0)
    ft = {k: torch.randn(N, *v).relu() for k, v in STAGES.items()}
    base = {k: torch.randn(N, *v).relu() for k, v in STAGES.items()}
    y = torch.randint(100, (N,))
    index = torch.randperm(50000)[:N]
    logits0 = torch.randn(N, 100)
    print(f"resnet32x4 -> resnet8x4 features, batch {N}, {torch.get_num_threads()} threads, "
          f"{args.reps} interleaved forward+backward runs each")
    print(f"{'loss':11} {'kdcore ms':>10} {'plain ms':>10} {'ratio':>6} {'median':>7} {'|diff|':>9}")
    for name in args.losses.split(","):
        kw = {"num_data": 50000} if name == "crd" else {}
        L = kdcore.create("loss", name, student_layers=TAPS[name],
                          **({} if name == "uskd" else {"teacher_layers": TAPS[name]}), **kw)

        def inputs():
            fs = {k: v.clone().requires_grad_() for k, v in base.items()}
            logits = logits0.clone().requires_grad_()
            return fs, logits

        def run_kdcore():
            fs, logits = inputs()
            so = kdcore.Outputs(logits, features=fs, index=index)
            to = kdcore.Outputs(logits0, features=ft, index=index) if L.uses_teacher else None
            v = L(so, to, y)
            v.backward()
            return v

        def run_plain():
            fs, logits = inputs()
            v = PLAIN[name](L, fs, ft, y, logits if name == "uskd" else index)
            v.backward()
            return v

        run_kdcore()  # materialise connectors (and CRD's normaliser)
        snapshot = copy.deepcopy(L.state_dict())  # CRD's bank moves with every call
        torch.manual_seed(1)
        a_val = run_kdcore().item()
        L.load_state_dict(snapshot)
        torch.manual_seed(1)
        b_val = run_plain().item()
        a, b = interleaved(run_kdcore, run_plain, args.reps)
        ratio, med = min(a) / min(b), statistics.median(a) / statistics.median(b)
        print(f"{name:11} {min(a) * 1e3:10.2f} {min(b) * 1e3:10.2f} {ratio:6.2f} {med:7.2f} "
              f"{abs(a_val - b_val):9.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
