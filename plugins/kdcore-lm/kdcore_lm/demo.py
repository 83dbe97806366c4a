"""``kdcore demo lm``: distillation on ``synthetic_lm``, where the true next-token law is known.

A teacher (a tiny Llama-style ``hf`` model) learns the HMM language from every
training sequence; students (a smaller one) see only the first few sequences,
with ``ce`` alone and with ``ce`` plus a fused ``kd`` (``chunk_size``) under
several divergences (``kl``, ``rkl``; ``jsd``, ``skew_kl``, ``tvd`` where
kdcore-divergences is installed; ABKD's ``ab`` at alpha 0.2, beta 0.7 where
kdcore-abkd is), each for several seeds. The table (kdcore's shared demo
presentation, :func:`kdcore.cli.demo.present`) is sorted by the mean per-token KL
from the truth ``KL(p* || q)``, with mean and spread over seeds of it, of the
perplexity, of the top-1 agreement with the teacher and of the top-1 accuracy,
the truth and the teacher as reference rows, one verdict line and ``demo.png``;
and the peak memory of a training step (``run.measure_memory``: the tensors one
step allocates, e.g. the logits, the loss and the gradients). Every number
comes from the runs' ``summary.json`` (``test_kl``, ``test_ppl``,
``test_agreement``, ``test_acc``, ``peak_step_mib``).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

DATA: dict[str, Any] = {"name": "synthetic_lm", "n": 1200, "length": 24, "vocab_size": 64, "states": 8,
                        "split": [0.8, 0.1, 0.1]}
#: the students' share of the training split (sequences)
FEW = 32
SEEDS = (1, 2, 3)
TEACHER_MODEL = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2}
STUDENT_MODEL = {**TEACHER_MODEL, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
TEACHER: dict[str, Any] = {
    "run": {"seed": 0, "epochs": 6, "batch_size": 32, "progress": "off", "threads": 1, "log_every": 1000},
    "data": DATA, "student": {"backbone": "hf", "config": TEACHER_MODEL},
    "optim": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0}, "loss": [{"name": "ce"}],
}
STUDENT: dict[str, Any] = {
    "run": {"seed": 1, "epochs": 40, "batch_size": 16, "progress": "off", "threads": 1, "log_every": 1000,
            "measure_memory": True},
    "data": {**DATA, "train_size": FEW}, "student": {"backbone": "hf", "config": STUDENT_MODEL},
    "optim": {"name": "adamw", "lr": 5e-3, "weight_decay": 0.0}, "loss": [{"name": "ce"}],
}
#: (row label, the kd term's divergence); rows whose divergence is not installed are skipped
METHODS = (("ce + kd", "kl"), ("ce + kd (rkl)", "rkl"), ("ce + kd (jsd)", "jsd"),
           ("ce + kd (skew_kl)", "skew_kl"), ("ce + kd (tvd)", "tvd"),
           ("ce + kd (ab 0.2, 0.7)", {"name": "ab", "alpha": 0.2, "beta": 0.7}))
#: rows of the kd terms per chunk: the fused projection (the hf backbone returns hidden and head)
CHUNK = 128
COLUMNS = (("kl", "KL to truth"), ("ppl", "perplexity"), ("agree", "agreement"), ("acc", "top-1 acc"),
           ("mem", "step peak MiB"))
KEYS = {"kl": "test_kl", "ppl": "test_ppl", "agree": "test_agreement", "acc": "test_acc", "mem": "peak_step_mib"}


def run_demo(out_dir: str | Path = "runs/demo-lm", *, teacher_epochs: int | None = None,
             student_epochs: int | None = None, seeds: tuple[int, ...] = SEEDS, quiet: bool = False,
             data: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run the demo and return its rows (also printed); ``data`` overrides keys of :data:`DATA`."""
    import kdcore
    from kdcore.cli.demo import present, seed_rows, sort_groups, verdict

    out = Path(out_dir)
    say = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    data = {**DATA, **(data or {})}
    teacher_cfg = copy.deepcopy({**TEACHER, "data": data})
    if teacher_epochs:
        teacher_cfg["run"]["epochs"] = teacher_epochs
    say(f"[demo lm] training the teacher (hf llama, hidden {TEACHER_MODEL['hidden_size']}) on every training "
        f"sequence -> {out / 'teacher'}")
    kdcore.train(teacher_cfg, out / "teacher", quiet=True)
    ckpt = str((out / "teacher" / "checkpoints" / "best.pt").resolve())
    divergences = set(kdcore.available("divergence"))
    rows, taught = [], []
    for label, div in (("ce", None),) + METHODS:
        name = div["name"] if isinstance(div, dict) else div
        if name is not None and name not in divergences:
            say(f"[demo lm] skipping {label}: divergence {name!r} is not installed")
            continue
        say(f"[demo lm] students on {FEW} sequences with {label}, seeds {', '.join(map(str, seeds))}")
        summaries = []
        for seed in seeds:
            conf = copy.deepcopy({**STUDENT, "data": {**data, "train_size": FEW}})
            conf["run"]["seed"] = seed
            if student_epochs:
                conf["run"]["epochs"] = student_epochs
            if div is not None:
                conf["teacher"] = {"backbone": "hf", "config": dict(TEACHER_MODEL), "checkpoint": ckpt}
                conf["loss"].append({"name": "kd", "divergence": div, "chunk_size": CHUNK})
            summaries.append(kdcore.train(conf, out / f"student-{name or 'ce'}-s{seed}", quiet=True))
        taught += summaries if div is not None else []
        rows.append(seed_rows(label, None, summaries, KEYS))
    rows = sort_groups(rows, "kl")
    truth_acc, truth_ppl = _truth_scores(data)
    references = [{"method": "truth", "group": None, "kl": (0.0, 0.0), "ppl": (truth_ppl, 0.0),
                   "agree": (None, None), "acc": (truth_acc, 0.0), "mem": (None, None)}]
    if taught:  # the teacher the students learnt from (best.pt), as their runs evaluated it
        references.append({"method": "teacher", "group": None, "agree": (1.0, 0.0), "mem": (None, None),
                           **{col: (taught[0][f"teacher_{key}"], 0.0) for col, key in KEYS.items()
                              if col not in ("agree", "mem")}})
    baseline = next(r for r in rows if r["method"] == "ce")
    present(references + rows, COLUMNS, "kl", len(seeds), out, [verdict(rows, baseline, "kl", "the true law")],
            title=f"students on {FEW} sequences; teacher on {round(data['n'] * data['split'][0])}",
            xlabel="per-token KL(truth || model) on synthetic_lm (test)")
    return references + rows


def _truth_scores(data: dict[str, Any]) -> tuple[float, float]:
    """Top-1 accuracy and perplexity of the true next-token law on the test split (kept positions)."""
    import math

    import kdcore

    splits = kdcore.create("dataset", "synthetic_lm", **{k: v for k, v in data.items() if k != "name"})
    test = splits.test if splits.test is not None else splits.val
    keep = test.targets != -100
    post, target = test.posterior[keep], test.targets[keep]
    nll = -post.gather(-1, target.unsqueeze(-1)).clamp(min=1e-30).log().mean()
    return float((post.argmax(-1) == target).float().mean()), math.exp(float(nll))
