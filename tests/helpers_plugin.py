"""A third-party test plugin, installed as a fake distribution with an entry point
(imported by file path, like helpers_runs).

``kdcore-hinttest`` registers, written only against kdcore's public API:

- loss ``hint``: a FitNets-style hint term ``mean((W f_s + b - f_t)^2)`` on one
  student tap and one teacher tap, with a trainable linear connector and a
  buffer counting the batches it has seen (both must survive a resume);
- dataset ``toy_tokens``: sequences in structured batches (``input_ids``,
  ``target`` with ``-100`` at a varying number of positions per sample);
- backbone ``toy_lm``: embedding, one tanh layer and a vocabulary head; it
  returns ``Outputs(hidden=..., head=...)`` (no logits) so the fused path applies.
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

SOURCE = '''
import torch
from torch import nn

import kdcore
from kdcore.data import DataSplits, TensorSplit


class Hint(nn.Module):
    uses_outputs = True

    def __init__(self, *, student_layers="net.2", teacher_layers="net.2", student_dim=8, teacher_dim=32):
        super().__init__()
        self.student_taps, self.teacher_taps = [student_layers], [teacher_layers]
        self.connector = nn.Linear(student_dim, teacher_dim)
        self.register_buffer("visits", torch.zeros(600, dtype=torch.float64))

    def forward(self, student, teacher, target):
        fs = student.features[self.student_taps[0]]
        ft = teacher.features[self.teacher_taps[0]]
        if self.training:
            self.visits.index_add_(0, student.index.to(self.visits.device),
                                   torch.ones(len(student.index), dtype=torch.float64))
        return (self.connector(fs) - ft).pow(2).mean()


class RowsSeen(nn.Module):
    uses_teacher = False
    batch_level = True
    buffer_sync = "none"

    def __init__(self):
        super().__init__()
        self.register_buffer("rows", torch.zeros((), dtype=torch.long))

    def forward(self, student, teacher, target):
        self.rows.fill_(max(int(self.rows), student.shape[0]))
        return student.sum() * 0.0


def toy_tokens(n=96, length=6, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length + 1), generator=g)
    target = ids[:, 1:].clone()
    prompt = torch.randint(0, length - 1, (n,), generator=g)  # a prompt of varying length: no loss there
    target[torch.arange(length).unsqueeze(0) < prompt.unsqueeze(1)] = -100
    inputs = {"input_ids": ids[:, :-1]}
    return DataSplits(TensorSplit(inputs, target), TensorSplit({"input_ids": ids[:16, :-1]}, target[:16]),
                      None, num_classes=vocab, input_shape=(length,))


class ToyLM(nn.Module):
    def __init__(self, num_classes, hidden=16, fused=True):
        super().__init__()
        self.embed = nn.Embedding(num_classes, hidden)
        self.layer = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_classes)
        self.fused = fused

    def forward(self, input_ids):
        h = torch.tanh(self.layer(self.embed(input_ids)))
        if self.fused:
            return kdcore.Outputs(hidden=h, head=self.head)
        return self.head(h)


@kdcore.hookimpl
def register_losses(register):
    register("hint", Hint)
    register("rows_seen", RowsSeen)


@kdcore.hookimpl
def register_datasets(register):
    register("toy_tokens", toy_tokens)


@kdcore.hookimpl
def register_backbones(register):
    register("toy_lm", ToyLM)
'''


def install(root: Path) -> Path:
    """Write the distribution under ``root`` (put ``root`` on ``sys.path`` / PYTHONPATH)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "kdcore_hinttest.py").write_text(SOURCE)
    info = root / "kdcore_hinttest-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kdcore-hinttest\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[kdcore]\nhinttest = kdcore_hinttest\n")
    return root


def entry_points(root: Path) -> list[md.EntryPoint]:
    return [ep for d in md.distributions(path=[str(root)]) for ep in d.entry_points if ep.group == "kdcore"]
