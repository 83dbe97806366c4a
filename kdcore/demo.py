"""``kdcore demo``: the main job on the embedded default, offline.

Distillation helps where the teacher knows more than the student's data say.
The demo trains a teacher on the full training split of ``gaussian_mixture``
(9,000 samples), then students that see only a small labelled subset (the
first 300 samples): with ``ce`` alone and with ``ce`` plus every installed
logit distillation loss (default parameters, the teacher's soft labels on
that subset), each for several seeds. It prints a table sorted by the mean
total-variation distance to the exact Bayes posterior, with mean and spread
(standard deviation over seeds) of that distance and of the test accuracy, the
Bayes posterior and the teacher as reference rows, and one line saying which
methods are closer to the truth than ``ce`` by more than the spread. With
matplotlib installed it also draws the table as ``demo.png`` in the output folder.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch

from kdcore.errors import ConfigError
from kdcore.losses import LogitLoss
from kdcore.plugins import default_registry

TEACHER: dict[str, Any] = {
    "run": {"seed": 0, "epochs": 10, "batch_size": 64, "progress": "off", "threads": 1},
    "data": {"name": "gaussian_mixture"},
    "student": {"backbone": "mlp", "hidden": [128, 128]},
    "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
    "loss": [{"name": "ce"}],
}

#: the students' labelled subset of the training split
LABELLED = 300
SEEDS = (1, 2, 3)

STUDENT: dict[str, Any] = {
    "run": {"seed": 1, "epochs": 30, "batch_size": 32, "progress": "off", "threads": 1, "log_every": 1000},
    "data": {"name": "gaussian_mixture", "train_size": LABELLED},
    "student": {"backbone": "mlp", "hidden": [16]},
    "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.0},
    "loss": [{"name": "ce"}],
}


def distillation_losses(registry) -> list[tuple[str, str | None]]:
    """``(name, reason to skip or None)`` for every registered logit loss that uses a teacher."""
    out = []
    for name in registry.available("loss"):
        comp = registry.get("loss", name)
        factory = comp.factory
        if getattr(factory, "uses_outputs", False):
            out.append((name, "a feature loss: it needs taps of a convolutional pair (see examples/features_*)"))
            continue
        if not (isinstance(factory, type) and issubclass(factory, LogitLoss) and factory.uses_teacher):
            continue
        try:
            registry.create("loss", name)
            out.append((name, None))
        except (ConfigError, TypeError) as exc:
            out.append((name, f"needs parameters ({exc})"))
    return out


def bayes_accuracy(split) -> float:
    return float((split.posterior.argmax(-1) == split.targets).float().mean())


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return m, sd


def run_demo(out_dir: str | Path = "runs/demo", *, teacher_epochs: int | None = None,
             student_epochs: int | None = None, seeds: tuple[int, ...] = SEEDS,
             quiet: bool = False) -> list[dict[str, Any]]:
    """Run the demo and return one row per method (also printed as a table).

    Every number comes from the runs' summaries (``summary.json``)."""
    from kdcore.engine import train

    registry = default_registry()
    out = Path(out_dir)
    say = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    teacher_cfg = copy.deepcopy(TEACHER)
    if teacher_epochs:
        teacher_cfg["run"]["epochs"] = teacher_epochs
    say(f"[demo] training the teacher (mlp {teacher_cfg['student']['hidden']}, all 9000 training samples)"
        f" -> {out / 'teacher'}")
    t_summary = train(teacher_cfg, out / "teacher", quiet=True, registry=registry)
    ckpt = str((out / "teacher" / "checkpoints" / "best.pt").resolve())

    data = registry.create("dataset", "gaussian_mixture")
    rows = [{"method": "bayes posterior", "acc": (bayes_accuracy(data.test), 0.0), "tv": (0.0, 0.0)},
            {"method": "teacher", "acc": (t_summary["test_acc"], 0.0), "tv": (t_summary["test_tv"], 0.0)}]
    methods: list[tuple[str, str | None]] = [("ce", None)] + distillation_losses(registry)
    students = []
    for name, skip in methods:
        if skip:
            say(f"[demo] skipping {name}: {skip}")
            continue
        label = "ce" if name == "ce" else f"ce + {name}"
        say(f"[demo] students on {LABELLED} labelled samples with {label}, seeds {', '.join(map(str, seeds))}")
        accs, tvs = [], []
        for seed in seeds:
            conf = copy.deepcopy(STUDENT)
            conf["run"]["seed"] = seed
            if student_epochs:
                conf["run"]["epochs"] = student_epochs
            if name != "ce":
                conf["teacher"] = {"backbone": "mlp", "hidden": TEACHER["student"]["hidden"], "checkpoint": ckpt}
                conf["loss"].append({"name": name})
            summary = train(conf, out / f"student-{name}-s{seed}", quiet=True, registry=registry)
            accs.append(summary["test_acc"])
            tvs.append(summary["test_tv"])
        students.append({"method": label, "acc": mean_std(accs), "tv": mean_std(tvs)})
    students.sort(key=lambda r: r["tv"][0])
    rows += students
    print(format_table(rows, len(seeds)))
    print(verdict(students))
    chart = draw_chart(rows, out / "demo.png")
    print(f"\nruns and TensorBoard logs: {out}  (tensorboard --logdir {out})")
    print(f"chart: {chart}" if chart else "chart: pip install matplotlib to get demo.png")
    return rows


def verdict(students: list[dict[str, Any]]) -> str:
    """Which methods are closer to the Bayes posterior than ce alone by more than the spread."""
    ce = next(r for r in students if r["method"] == "ce")
    better = [r["method"] for r in students if r["method"] != "ce"
              and ce["tv"][0] - r["tv"][0] > max(ce["tv"][1], r["tv"][1])]
    if better:
        return (f"\ncloser to the Bayes posterior than ce alone by more than the seeds' spread: "
                f"{', '.join(better)}; the other differences are within the spread")
    return "\nno distillation method is closer to the Bayes posterior than ce alone by more than the seeds' spread"


def draw_chart(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """The table as a bar chart (TV to the Bayes posterior, with spread); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [r["method"] for r in rows][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    ax.barh(names, [r["tv"][0] for r in rows][::-1], xerr=[r["tv"][1] for r in rows][::-1], color="#4477aa")
    ax.set_xlabel("total-variation distance to the Bayes posterior (test, mean and std over seeds)")
    ax.set_title(f"students on {LABELLED} labelled samples; teacher on 9000")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(rows: list[dict[str, Any]], seeds: int) -> str:
    width = max(len(r["method"]) for r in rows)
    lines = [f"{'method':<{width}}  {'test acc':>17}  {'TV to Bayes':>17}   (mean ± std over {seeds} seeds)",
             f"{'-' * width}  {'-' * 17}  {'-' * 17}"]
    for r in rows:
        (a, sa), (t, st) = r["acc"], r["tv"]
        lines.append(f"{r['method']:<{width}}  {a:8.4f} ± {sa:.4f}  {t:8.4f} ± {st:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    run_demo()
