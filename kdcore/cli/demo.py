"""``kdcore demo``: the main job on the embedded default, offline, and the
presentation that every demo shares (a plugin's demo too, docs/plugins.md,
``register_demos``).

Distillation helps where the teacher knows more than the student's data say.
The demo trains a teacher on the full training split of ``gaussian_mixture``
(9,000 samples), then students that see only a small labelled subset (the
first 300 samples), each for several seeds, in two row groups:

- the teacher's soft labels on the labelled subset only: ``ce`` alone and
  ``ce`` plus every installed logit distillation loss (default parameters);
- the same 300 labels plus the teacher's soft labels on an unlabelled transfer
  set (the next 2,700 training samples, target -100: ``ce`` ignores them, the
  distillation term has ``rows = "all"``), for every loss that needs no labels.

It prints a table sorted by the mean total-variation distance to the exact
Bayes posterior within each group, with mean and spread (standard deviation
over seeds) of that distance and of the test accuracy, the Bayes posterior and
the teacher the students learnt from as reference rows, and one line saying
which methods are closer to the truth than ``ce`` by more than the spread.
With matplotlib installed it also draws the table as ``demo.png`` in the
output folder. Every number comes from the runs' ``summary.json``.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kdcore.common.errors import ConfigError
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
#: the unlabelled transfer set (the training samples after the labelled ones)
TRANSFER = 2700
SEEDS = (1, 2, 3)

STUDENT: dict[str, Any] = {
    "run": {"seed": 1, "epochs": 30, "batch_size": 32, "progress": "off", "threads": 1, "log_every": 1000},
    "data": {"name": "gaussian_mixture", "train_size": LABELLED},
    "student": {"backbone": "mlp", "hidden": [16]},
    "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.0},
    "loss": [{"name": "ce"}],
}

#: the transfer-set students: ten times the rows, so fewer epochs of larger batches
TRANSFER_RUN: dict[str, Any] = {"epochs": 8, "batch_size": 64}

#: the columns of the table (row key, heading); rows are sorted by ``DISTANCE``
COLUMNS = (("acc", "test acc"), ("tv", "TV to Bayes"))
DISTANCE = "tv"

Row = dict[str, Any]  # {"method": str, "group": str | None, key: (mean, std) for each column}


#: the demo's baseline, trained by every row group's first row
BASELINE = "ce"


def distillation_losses(registry) -> list[tuple[str, str | None, bool]]:
    """``(name, reason to skip or None, needs labels)`` for every registered loss but the
    baseline ``ce``: each gets a row of the table or a ``skipping NAME: reason`` line.
    A row needs a loss that takes the two models' logits and a teacher, and builds with
    its default parameters."""
    return [(name, *_plan(registry, name)) for name in registry.available("loss") if name != BASELINE]


def _plan(registry, name: str) -> tuple[str | None, bool]:
    """``(reason to skip or None, needs labels)`` of loss ``name`` in the demo, from what
    the loss declares (its attributes: docs/plugins.md) and whether it builds with its defaults."""
    try:
        loss, problem = registry.create("loss", name), None
    except (ConfigError, TypeError) as exc:  # what it declares, then, is on its class
        loss, problem = registry.get("loss", name).factory, f"it needs parameters ({exc})"
    if not getattr(loss, "uses_teacher", True):
        return f"it uses no teacher (the supervised baseline here is {BASELINE})", True
    if getattr(loss, "uses_outputs", False):
        return ("a feature loss: it matches the models' intermediate features, and this demo compares "
                "what students learn from soft labels alone"), True
    if problem is not None:
        return problem, True
    return None, bool(getattr(loss, "uses_target", True))


def bayes_accuracy(split) -> float:
    return float((split.posterior.argmax(-1) == split.targets).float().mean())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return m, sd


def seed_rows(method: str, group: str | None, summaries: Sequence[dict[str, Any]],
              keys: dict[str, str]) -> Row:
    """A table row from the runs' summaries: ``keys`` maps a column to its summary key
    (``(None, None)``, shown as ``-``, where a run does not report it: e.g. the
    agreement with a teacher of a run without one)."""
    return {"method": method, "group": group,
            **{col: mean_std([s[key] for s in summaries]) if all(key in s for s in summaries) else (None, None)
               for col, key in keys.items()}}


def run_demo(out_dir: str | Path = "runs/demo", *, teacher_epochs: int | None = None,
             student_epochs: int | None = None, seeds: tuple[int, ...] = SEEDS, transfer: int = TRANSFER,
             quiet: bool = False) -> list[Row]:
    """Run the demo and return one row per method (also printed as a table)."""
    from kdcore.engine import train

    registry = default_registry()
    out = Path(out_dir)
    say = _say(quiet)
    teacher_cfg = copy.deepcopy(TEACHER)
    if teacher_epochs:
        teacher_cfg["run"]["epochs"] = teacher_epochs
    say(f"[demo] training the teacher (mlp {teacher_cfg['student']['hidden']}, all 9000 training samples)"
        f" -> {out / 'teacher'}")
    train(teacher_cfg, out / "teacher", quiet=True, registry=registry)
    ckpt = str((out / "teacher" / "checkpoints" / "best.pt").resolve())
    teacher = {"backbone": "mlp", "hidden": TEACHER["student"]["hidden"], "checkpoint": ckpt}

    def students(name: str, transfer_rows: int) -> list[dict[str, Any]]:
        summaries = []
        for seed in seeds:
            conf = copy.deepcopy(STUDENT)
            conf["run"]["seed"] = seed
            if transfer_rows:
                conf["run"].update(TRANSFER_RUN)
                conf["data"].update(train_size=LABELLED + transfer_rows, unlabelled=transfer_rows)
            if student_epochs:
                conf["run"]["epochs"] = student_epochs
            if name != "ce":
                conf["teacher"] = dict(teacher)
                conf["loss"].append({"name": name, **({"rows": "all"} if transfer_rows else {})})
            run = f"student-{name}-s{seed}" if not transfer_rows else f"transfer-{name}-s{seed}"
            summaries.append(train(conf, out / run, quiet=True, registry=registry))
        return summaries

    keys = {"tv": "test_tv", "acc": "test_acc"}
    labelled_group = f"soft labels on the {LABELLED} labelled samples"
    transfer_group = f"soft labels also on {transfer} unlabelled samples (transfer set)"
    losses = distillation_losses(registry)
    seed_list = ", ".join(map(str, seeds))
    labelled: list[Row] = []
    taught: list[dict[str, Any]] = []
    for name, skip, _ in [(BASELINE, None, True)] + losses:
        if skip:
            say(f"[demo] skipping {name}: {skip}")
            continue
        label = "ce" if name == "ce" else f"ce + {name}"
        say(f"[demo] students on {LABELLED} labelled samples with {label}, seeds {seed_list}")
        summaries = students(name, 0)
        taught += summaries if name != "ce" else []
        labelled.append(seed_rows(label, labelled_group, summaries, keys))
    transferred: list[Row] = []
    for name, skip, needs_labels in losses if transfer else []:
        if skip or needs_labels:
            if not skip:
                say(f"[demo] transfer set: skipping {name} (it needs the labels, which the transfer set lacks)")
            continue
        say(f"[demo] students on {LABELLED} labelled + {transfer} unlabelled samples with ce + {name} "
            f"(rows = 'all'), seeds {seed_list}")
        transferred.append(seed_rows(f"ce + {name} (transfer)", transfer_group, students(name, transfer), keys))

    data = registry.create("dataset", "gaussian_mixture")
    references = [{"method": "bayes posterior", "group": None, "tv": (0.0, 0.0),
                   "acc": (bayes_accuracy(data.test), 0.0)}]
    if taught:  # the teacher the students learnt from (best.pt), as their runs evaluated it
        references.append({"method": "teacher", "group": None, "tv": (taught[0]["teacher_test_tv"], 0.0),
                           "acc": (taught[0]["teacher_test_acc"], 0.0)})
    labelled, transferred = sort_groups(labelled, DISTANCE), sort_groups(transferred, DISTANCE)
    baseline = next(r for r in labelled if r["method"] == "ce")
    lines = [verdict(labelled + transferred, baseline, DISTANCE, "the Bayes posterior")]
    if transferred:
        pairs = [(r, next(x for x in labelled if x["method"] == r["method"].removesuffix(" (transfer)")))
                 for r in transferred]
        gained = [r["method"].removesuffix(" (transfer)") for r, ref in pairs if closer(r, ref, DISTANCE)]
        lines.append(f"with the transfer set, closer than on the labelled samples alone by more than the spread: "
                     f"{', '.join(gained) if gained else 'none'}")
    present(references + labelled + transferred, COLUMNS, DISTANCE, len(seeds), out, lines, title=f"students on {LABELLED} labelled samples; teacher on 9000",
            xlabel="total-variation distance to the Bayes posterior (test)")
    return references + labelled + transferred


#: the demos that plugins provide, and the distribution that provides each
KNOWN_DEMOS = {"lm": "kdcore-lm"}


def plugin_demos(registry) -> dict[str, Callable[..., Any]]:
    """The demos registered through the ``register_demos`` hook: name -> ``run(out_dir, *, quiet)``."""
    found: dict[str, Callable[..., Any]] = {}
    if registry.hooks is None:
        return found
    for impl in registry.hooks.hook.register_demos.get_hookimpls():
        impl.function(register=found.__setitem__)
    return found


def find_demo(registry, name: str | None) -> Callable[..., Any]:
    """``run_demo`` for no name, else the plugin demo ``name`` (ConfigError when none provides it)."""
    if name is None:
        return run_demo
    demos = plugin_demos(registry)
    if name in demos:
        return demos[name]
    if name in KNOWN_DEMOS:
        dist = KNOWN_DEMOS[name]
        raise ConfigError(f"demo {name!r} comes with {dist}, which is not installed: "
                          f"pip install -e plugins/{dist} (or bash scripts/setup.sh)")
    raise ConfigError(f"demo {name!r}: no installed plugin provides it (installed demos: "
                      f"{', '.join(sorted(demos)) or 'none'})")


def _say(quiet: bool) -> Callable[[str], None]:
    return (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr, flush=True))


def sort_groups(rows: Sequence[Row], key: str) -> list[Row]:
    """Rows sorted by their mean ``key`` within each group, groups in their first order."""
    groups = list(dict.fromkeys(r.get("group") for r in rows))
    return [r for g in groups for r in sorted((r for r in rows if r.get("group") == g), key=lambda r: r[key][0])]


def closer(row: Row, ref: Row, key: str) -> bool:
    """Whether ``row`` is closer to the truth than ``ref`` by more than either's spread."""
    return ref[key][0] - row[key][0] > max(ref[key][1], row[key][1])


def verdict(rows: Sequence[Row], baseline: Row, key: str, truth: str) -> str:
    """One line: which rows are closer to ``truth`` than ``baseline`` by more than the seeds' spread."""
    others = [r for r in rows if r is not baseline]
    better = [r["method"] for r in others if closer(r, baseline, key)]
    if better:
        rest = "; the other differences are within the spread" if len(better) < len(others) else ""
        return (f"closer to {truth} than {baseline['method']} alone by more than the seeds' spread: "
                f"{', '.join(better)}{rest}")
    return f"no distillation method is closer to {truth} than {baseline['method']} alone by more than the seeds' spread"


def present(rows: Sequence[Row], columns: Sequence[tuple[str, str]], key: str, seeds: int, out: Path,
            lines: Sequence[str], *, title: str, xlabel: str) -> Path | None:
    """Print a demo's table and its verdict lines, draw the ``key`` column as ``out/demo.png``;
    returns the chart's path (None without matplotlib)."""
    print(format_table(rows, columns, seeds))
    print()
    for line in lines:
        print(line)
    chart = draw_chart(rows, out / "demo.png", key, xlabel=xlabel, title=title)
    print(f"\nruns and TensorBoard logs: {out}  (tensorboard --logdir {out})")
    print(f"chart: {chart}" if chart else "chart: pip install matplotlib to get demo.png")
    return chart


def draw_chart(rows: Sequence[Row], path: Path, key: str, *, xlabel: str, title: str) -> Path | None:
    """The table's ``key`` column as a bar chart with the seeds' spread; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return None
    palette = ["#bbbbbb", "#4477aa", "#ee6677", "#228833", "#ccbb44"]
    groups = list(dict.fromkeys(r.get("group") for r in rows))
    shown = list(rows)[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(shown) + 1.6))
    ax.barh([r["method"] for r in shown], [r[key][0] for r in shown], xerr=[r[key][1] for r in shown],
            color=[palette[groups.index(r.get("group")) % len(palette)] for r in shown])
    handles = [Patch(color=palette[i % len(palette)], label=g) for i, g in enumerate(groups) if g is not None]
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=8)
    ax.set_xlim(left=0)
    ax.set_xlabel(f"{xlabel}, mean and std over seeds")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def format_table(rows: Sequence[Row], columns: Sequence[tuple[str, str]], seeds: int) -> str:
    """The rows as a text table: one ``mean ± std`` cell per column, a heading line per group."""
    width = max(len(r["method"]) for r in rows)
    head = "  ".join(f"{label:>17}" for _, label in columns)
    lines = [f"{'method':<{width}}  {head}   (mean ± std over {seeds} seeds)",
             "  ".join(["-" * width] + ["-" * 17] * len(columns))]
    group = None
    for r in rows:
        if r.get("group") is not None and r.get("group") != group:
            group = r["group"]
            lines.append(f"{group}:")
        cells = "  ".join(f"{'-':>17}" if r[k][0] is None else f"{r[k][0]:8.4f} ± {r[k][1]:.4f}"
                          for k, _ in columns)
        lines.append(f"{r['method']:<{width}}  {cells}")
    return "\n".join(lines)
