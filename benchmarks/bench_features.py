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
student, resnet32x4 teacher with random weights, 100 classes, batch 64 of 32x32
inputs, SGD lr 0.05 momentum 0.9 weight decay 5e-4, CPU). Per method, three steps
are timed, interleaved (the order alternating forward and reversed):

* kdcore: ``Trainer.train_step`` of the engine (``build_trainer`` on a config with
  ``[[loss]] ce`` + the method at weight 1 with its default taps for the zoo pair;
  crd with ``num_data = 50000``; uskd has no teacher), on a fixed batch of inputs,
  labels and sample indices;
* hand-written: the loop one writes by hand: ``register_forward_hook`` on the same
  modules of its own student (the engine's initial weights loaded) and teacher,
  the teacher's forward under ``no_grad``, ``F.cross_entropy + plain_<method>``
  with a deep copy of the engine's materialised connectors, ``backward``,
  ``torch.optim.SGD`` (the same settings) ``step``, ``zero_grad(set_to_none=True)``;
* KD: the engine's step with ``ce`` + ``kd`` at T = 4 (the "vs KD" column).

Before timing, one step of each side from the same state is checked to give the
same loss (``|diff|``). Printed: the median step times, the ratio kdcore /
hand-written of the fastest and of the median steps (goal <= 1.05), the median of the
per-round ratios (``paired``: the two steps of a round see the same load) and kdcore /
KD of the medians, in process CPU time; ``--threads 1`` is the steady setting on a
shared machine (wall time varies 2x there). The hand-written CRD gathers the
``64 x 16385`` sampled bank rows (the authors' formula); kdcore scores them with one
matrix product, so its ratio there is the loss's, not the engine's.

    .venv/bin/python benchmarks/bench_features.py --step --threads 1 [--losses ...] [--reps 7]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import kdcore

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
    with torch.no_grad():  # Z, fixed on the first training batch (the authors' code)
        for i, out in enumerate((out_s, out_t)):
            if L.normaliser[i] < 0:
                L.normaliser[i] = out.mean() * L.num_data
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


def interleaved(runs, reps: int, clock=time.perf_counter) -> list[list[float]]:
    """``reps`` timed calls of each of ``runs``, alternating the order (forward, then reversed)."""
    times: list[list[float]] = [[] for _ in runs]
    order = list(range(len(runs)))
    for i in range(reps):
        for which in (order if i % 2 == 0 else order[::-1]):
            start = clock()
            runs[which]()
            times[which].append(clock() - start)
    return times


def engine_config(tmp: str, terms: list[dict], teacher: bool, threads: int) -> dict:
    """A config the engine builds resnet32x4 -> resnet8x4 from (a small random 100-class image set:
    the data only have to let the trainer build; the timed batch is given to ``train_step``)."""
    conf = {
        "run": {"seed": 0, "epochs": 1, "batch_size": N, "device": "cpu", "progress": "off",
                "deterministic": False, "threads": threads},
        "data": {"name": "tensors", "path": os.path.join(tmp, "data.pt"), "num_classes": 100},
        "student": {"backbone": "resnet8x4"},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "loss": [{"name": "ce", "weight": 1.0}, *terms],
    }
    if teacher:
        conf["teacher"] = {"backbone": "resnet32x4", "checkpoint": os.path.join(tmp, "teacher.pt")}
    return conf


def hooked(model: torch.nn.Module, paths) -> dict:
    """``register_forward_hook`` on the modules at ``paths``: their outputs land in the returned dict."""
    out: dict = {}
    modules = dict(model.named_modules())
    for p in dict.fromkeys(paths):
        modules[p].register_forward_hook(lambda m, a, o, p=p: out.__setitem__(p, o))
    return out


def step_main(args) -> int:
    """Whole training steps: kdcore's engine against a hand-written loop and against KD (module docstring)."""
    from kdcore.engine import build_trainer
    from kdcore.engine.batches import Batch

    tmp = tempfile.mkdtemp()
    torch.manual_seed(0)
    torch.save({"inputs": torch.randn(2 * N, 3, 32, 32), "targets": torch.arange(2 * N) % 100},
               os.path.join(tmp, "data.pt"))
    teacher_state = kdcore.create("backbone", "resnet32x4", num_classes=100).state_dict()
    torch.save({"model": teacher_state}, os.path.join(tmp, "teacher.pt"))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 3, 32, 32, generator=g), torch.randint(100, (N,), generator=g)
    index = torch.randperm(50000, generator=g)[:N]
    batch = Batch(x, y, index)
    kd = build_trainer(engine_config(tmp, [{"name": "kd", "weight": 1.0, "temperature": 4.0}], True,
                                     args.threads), None, quiet=True)

    def kd_step():
        kd.train_step(batch)

    kd_step()  # warm-up
    print(f"training step, resnet32x4 -> resnet8x4, batch {N}, CPU, {torch.get_num_threads()} threads, "
          f"process CPU time, {args.reps} interleaved steps each; ms are medians")
    print(f"{'method':11} {'kdcore ms':>10} {'hand ms':>9} {'kd ms':>8} {'/hand fast':>11} {'/hand med':>10} "
          f"{'paired':>7} {'/kd med':>8} {'|diff|':>9}")
    for name in args.losses.split(","):
        term = {"name": name, "weight": 1.0, **({"num_data": 50000} if name == "crd" else {})}
        uses_teacher = name != "uskd"
        trainer = build_trainer(engine_config(tmp, [term], uses_teacher, args.threads), None, quiet=True)
        loss = trainer.objective.terms[1].loss  # materialised by the engine's shape-inference pass
        # the hand-written loop: its own copies, the same weights and connectors
        student = kdcore.create("backbone", "resnet8x4", num_classes=100)
        student.load_state_dict(trainer.student.state_dict())
        student.train()
        L = copy.deepcopy(loss)
        fs = hooked(student, L.student_taps)
        ft: dict = {}
        if uses_teacher:
            teacher = kdcore.create("backbone", "resnet32x4", num_classes=100)
            teacher.load_state_dict(teacher_state)
            teacher.eval().requires_grad_(False)
            ft = hooked(teacher, L.teacher_taps)
        opt = torch.optim.SGD([{"params": list(student.parameters())},
                               {"params": [p for p in L.parameters() if p.requires_grad]}],
                              lr=0.05, momentum=0.9, weight_decay=5e-4)
        plain = PLAIN[name]

        def hand_step():
            if uses_teacher:
                with torch.no_grad():
                    teacher(x)
            logits = student(x)
            value = F.cross_entropy(logits, y) + 1.0 * plain(L, fs, ft, y, logits if name == "uskd" else index)
            value.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return value.detach()

        def kdcore_step():
            trainer.train_step(batch)

        torch.manual_seed(2)  # CRD's negatives: the same draw on both sides
        a_val = float(sum(v.detach() for v in trainer.train_step(batch).values()))
        torch.manual_seed(2)
        b_val = float(hand_step())
        a, b, c = interleaved([kdcore_step, hand_step, kd_step], args.reps, time.process_time)
        ma, mb, mc = (statistics.median(t) for t in (a, b, c))
        paired = statistics.median(u / v for u, v in zip(a, b))  # steps of one round see the same load
        print(f"{name:11} {ma * 1e3:10.1f} {mb * 1e3:9.1f} {mc * 1e3:8.1f} {min(a) / min(b):11.3f} "
              f"{ma / mb:10.3f} {paired:7.3f} {ma / mc:8.2f} {abs(a_val - b_val):9.2e}", flush=True)
        del trainer, loss, L, student, opt
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
        a, b = interleaved([run_kdcore, run_plain], args.reps)
        ratio, med = min(a) / min(b), statistics.median(a) / statistics.median(b)
        print(f"{name:11} {min(a) * 1e3:10.2f} {min(b) * 1e3:10.2f} {ratio:6.2f} {med:7.2f} "
              f"{abs(a_val - b_val):9.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
