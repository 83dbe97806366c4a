"""Top-k store against sampled store against the running teacher, on ``synthetic_lm`` (CPU).

A llama-style teacher (kdcore-lm's ``hf`` backbone) is trained on ``synthetic_lm``
(vocabulary 256, whose exact next-token law is known); then students learn from it
with ``kd`` alone at temperature 1 (the case the sampled store is unbiased for), their
teacher's outputs coming from:

- ``online``: the running teacher;
- ``top-k 32``: a store of the teacher's top 32 ids (uint8 values, 62 bytes a position);
- ``sample 32``: a store of 32 draws from the teacher (as many ids; 20 bytes);
- ``sample 240``: a store of 240 draws (62 bytes: the top-k store's size).

Each student trains with ``--seeds`` (3 by default; seed s of every source
starts from the same weights and sees the same batches); the table gives the
student's KL to the true next-token law on the test split (nats per token), the
same less the online student's of the same seed (paired: the seeds' common
noise cancels), and its test NLL, each as mean and sample standard deviation
over the seeds, and the store's bytes per position. The teacher's own KL to the
truth and the teacher's mass outside its top 32 (mean over stored positions)
are printed for reference.

    .venv/bin/python benchmarks/bench_sampled_store.py [--epochs 6] [--teacher-epochs 8] [--seeds 0 1 2]
                                                      [--n 1024] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import tomli_w
import torch

import kdcore
from kdcore.engine.capture import capture
from kdcore.signals.store import StoreReader

LLAMA = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2}
STUDENT = {**LLAMA, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
TEACHER = {**LLAMA, "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2}
#: the students' teacher sources: name, capture arguments (None: the running teacher)
VARIANTS = [("online", None), ("top-k 32", {"top_k": 32}), ("sample 32", {"sample": 32}),
            ("sample 240", {"sample": 240})]


def _data(n: int) -> dict:
    return {"name": "synthetic_lm", "n": n, "length": 32, "vocab_size": 256, "states": 24}


def _teacher_config(n: int, epochs: int) -> dict:
    return {"run": {"seed": 0, "epochs": epochs, "batch_size": 32, "progress": "off"}, "data": _data(n),
            "student": {"backbone": "hf", "config": dict(TEACHER)},
            "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0, "lr_schedule": "cosine"},
            "loss": [{"name": "ce"}]}


def _student_config(n: int, epochs: int, seed: int, teacher: dict) -> dict:
    return {"run": {"seed": seed, "epochs": epochs, "batch_size": 32, "progress": "off"}, "data": _data(n),
            "teacher": teacher, "student": {"backbone": "hf", "config": dict(STUDENT)},
            "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0, "lr_schedule": "cosine",
                      "warmup_steps": 20},
            "loss": [{"name": "kd", "temperature": 1.0}]}


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(args) -> dict:
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_sampled_store_"))
    start = time.perf_counter()
    teacher_run = kdcore.train(_teacher_config(args.n, args.teacher_epochs), root / "teacher", quiet=True)
    model = {"backbone": "hf", "config": dict(TEACHER), "checkpoint": str(root / "teacher/checkpoints/best.pt")}
    kd_conf = root / "kd.toml"
    kd_conf.write_text(tomli_w.dumps(_student_config(args.n, args.epochs, 0, model)))
    out = {"settings": {"n": args.n, "epochs": args.epochs, "teacher_epochs": args.teacher_epochs,
                        "seeds": args.seeds, "threads": torch.get_num_threads()},
           "teacher_test_kl": teacher_run["test_kl"], "teacher_test_nll": teacher_run["test_nll"], "rows": []}
    for name, kept in VARIANTS:
        teacher, bytes_per_position = model, None
        if kept is not None:
            store = root / name.replace(" ", "_")
            manifest = capture(kd_conf, store, **kept, quiet=True)
            teacher = {"source": "store", "store": str(store)}
            bytes_per_position = manifest["bytes_per_position"]
            if "top_k" in kept:
                reader = StoreReader.open(store)
                out["top_k_tail_mass"] = reader.read(torch.arange(reader.n))[2].exp().mean().item()
        runs = [kdcore.train(_student_config(args.n, args.epochs, seed, teacher), root / f"{name}-{seed}".replace(
            " ", "_"), quiet=True) for seed in args.seeds]
        kls = [r["test_kl"] for r in runs]
        online = out["rows"][0]["test_kl"] if out["rows"] else kls
        kl, nll = _spread(kls), _spread([r["test_nll"] for r in runs])
        paired = _spread([a - b for a, b in zip(kls, online)])
        out["rows"].append({"source": name, "bytes_per_position": bytes_per_position, "test_kl": kls,
                            "test_nll": [r["test_nll"] for r in runs], "test_kl_mean": kl[0], "test_kl_sd": kl[1],
                            "paired_mean": paired[0], "paired_sd": paired[1], "test_nll_mean": nll[0],
                            "test_nll_sd": nll[1]})
        print(f"{name}: kl {kl[0]:.4f} +- {kl[1]:.4f} (less online's {paired[0]:+.4f} +- {paired[1]:.4f}), "
              f"nll {nll[0]:.4f} +- {nll[1]:.4f}", flush=True)
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def table(out: dict) -> str:
    lines = ["| teacher source | bytes per position | test KL to the truth | KL less the online student's (same seed) "
             "| test NLL |", "| --- | --- | --- | --- | --- |"]
    for r in out["rows"]:
        size = "-" if r["bytes_per_position"] is None else str(r["bytes_per_position"])
        lines.append(f"| {r['source']} | {size} | {r['test_kl_mean']:.4f} ± {r['test_kl_sd']:.4f} | "
                     f"{r['paired_mean']:+.4f} ± {r['paired_sd']:.4f} | "
                     f"{r['test_nll_mean']:.4f} ± {r['test_nll_sd']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024, help="synthetic_lm sequences (90%% train)")
    p.add_argument("--epochs", type=int, default=6, help="student epochs")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dir", default=None, help="where the runs and stores go (default: a new temporary folder)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = run(args)
    print(f"teacher: test kl {out['teacher_test_kl']:.4f}, nll {out['teacher_test_nll']:.4f}; its mass outside "
          f"its top 32: {out['top_k_tail_mass']:.3f}; {out['seconds']} s")
    print(table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
