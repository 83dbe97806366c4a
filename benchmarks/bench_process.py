"""The whole process ``kdcore train`` against a hand-written PyTorch script doing the same work.

Work: the 64-dimensional, 10-class ``gaussian_mixture`` (20000 samples: 18000
train, 1000 val), a frozen MLP teacher [1024, 1024] loaded from a checkpoint,
an MLP student [1024, 1024] trained with ce + Hinton KD (T = 4), SGD with
momentum, batch 256, 6 epochs, an evaluation of the val split and a checkpoint
(written atomically: temporary file, then rename) after every epoch. The
script writes one metrics line per epoch as well. Both run as fresh processes
(``python script.py`` against ``kdcore train config.toml --overwrite --quiet``),
interleaved, alternating which goes first; printed: each one's median wall
time and the median of the per-pair ratios kdcore / script (goal <= 1.03).

    .venv/bin/python benchmarks/bench_process.py [--reps 5] [--epochs 6]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIG = """
[run]
seed = 0
epochs = {epochs}
batch_size = 256
progress = "off"

[data]
name = "gaussian_mixture"
n = 20000
num_classes = 10
dim = 64

[teacher]
backbone = "mlp"
hidden = [1024, 1024]
checkpoint = "{teacher}"

[student]
backbone = "mlp"
hidden = [1024, 1024]

[optim]
name = "sgd"
lr = 0.01
momentum = 0.9
weight_decay = 5e-4

[[loss]]
name = "ce"

[[loss]]
name = "kd"
temperature = 4.0
"""

SCRIPT = '''
import json, os, sys
import torch
import torch.nn.functional as F
from torch import nn

out, teacher_ckpt, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
means = torch.randint(-1, 2, (10, 64), generator=g).float()
y = torch.randint(0, 10, (20000,), generator=g)
x = means[y] + 2.0 * torch.randn(20000, 64, generator=g)
xt, yt, xv, yv = x[:18000], y[:18000], x[18000:19000], y[18000:19000]


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 10))


teacher, student = mlp(), mlp()
teacher.load_state_dict({k.removeprefix("net."): v for k, v in
                         torch.load(teacher_ckpt, weights_only=True)["model"].items()})
teacher.eval().requires_grad_(False)
opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "metrics.jsonl"), "w") as metrics:
    for epoch in range(1, epochs + 1):
        student.train()
        for idx in torch.randperm(18000).split(256):
            xb, yb = xt[idx], yt[idx]
            s = student(xb)
            with torch.no_grad():
                t = teacher(xb)
            loss = F.cross_entropy(s, yb) + 16.0 * F.kl_div(
                F.log_softmax(s / 4.0, -1), F.log_softmax(t / 4.0, -1), log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        student.eval()
        with torch.no_grad():
            acc = (student(xv).argmax(-1) == yv).float().mean().item()
        path = os.path.join(out, "last.pt")
        torch.save({"model": student.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}, path + ".tmp")
        os.replace(path + ".tmp", path)
        metrics.write(json.dumps({"epoch": epoch, "loss": loss.item(), "val_acc": acc}) + "\\n")
        metrics.flush()
'''


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args(argv)
    from kdcore import create

    tmp = Path(tempfile.mkdtemp())
    teacher = tmp / "teacher.pt"
    torch.save({"model": create("backbone", "mlp", num_classes=10, in_features=64,
                                hidden=[1024, 1024]).state_dict()}, teacher)
    (tmp / "run.toml").write_text(CONFIG.format(epochs=args.epochs, teacher=teacher))
    (tmp / "script.py").write_text(SCRIPT)
    ours = [sys.executable, "-m", "kdcore", "train", str(tmp / "run.toml"), "--out", str(tmp / "kd"),
            "--overwrite", "--quiet"]
    plain = [sys.executable, str(tmp / "script.py"), str(tmp / "plain"), str(teacher), str(args.epochs)]
    wall(ours), wall(plain)  # warm-up (and a check that both run)
    a, b = [], []
    for i in range(args.reps):
        pair = [(a, ours), (b, plain)]
        for times, cmd in pair if i % 2 == 0 else pair[::-1]:
            times.append(wall(cmd))
    print(f"{args.epochs} epochs, {args.reps} interleaved pairs (fresh processes), "
          f"threads {torch.get_num_threads()}")
    print(f"kdcore train {statistics.median(a):.2f} s, script {statistics.median(b):.2f} s, "
          f"ratio (median of pairs) {statistics.median(x / y for x, y in zip(a, b)):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
