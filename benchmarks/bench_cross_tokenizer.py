"""Distillation across tokenizers on ``synthetic_lm`` tokenised two ways: test KL to the truth.

The language (kdcore-lm's ``synthetic_lm``, ``--vocab`` tokens, ``--states`` hidden
states) is read by the teacher in its own tokens and by the student in a finer
tokenisation in which ``--split`` of them are written as two pieces (a head shared by
two tokens, and a tail), so the two vocabularies and sequences differ. The teacher is
the language's exact law (backbone ``synthetic_lm_law``), so every method has the
same, perfect teacher and only the way it reaches the student differs. A tiny Llama
student (random init, ``hf``) trains ``--epochs`` epochs with ``ce`` plus each method's
distillation term (weight 1):

- ``no teacher``: ``ce`` alone;
- ``same tokenizer``: ``kd`` from the exact law of the student's own tokenisation
  (the reference: what a teacher sharing the student's tokenizer gives);
- ``cross prefix``: ``kd`` from the ``cross_tokenizer`` teacher, ``match = "prefix"``;
- ``cross exact``: the same, ``match = "exact"`` (only tokens both vocabularies spell alike,
  the rest of the teacher's mass dropped and the kept mass renormalised);
- ``cross exact, spread``: ``match = "exact"``, ``unplaced = "spread"`` (the teacher's mass on
  tokens the student spells otherwise spread evenly over the student tokens no teacher token
  reaches);
- ``uld``: ``uld`` on the teacher's own vocabulary at the aligned positions
  (``match = "none"``).

Reports the mean and standard deviation over the seeds (``run.seed``: the student's
initialisation and the batch order; the language is fixed) of the test split's
per-token ``KL(p* || q)`` to the student's exact next-token law, and the seconds per run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cross_tokenizer.py [--seeds 0,1,2]
        [--epochs 10] [--n 600] [--vocab 32] [--split 8] [--states 8] [--length 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import kdcore

STUDENT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2}


def methods(args) -> dict[str, tuple[dict | None, list[dict]]]:
    """Method name -> (the [teacher] table or None, the [[loss]] tables)."""
    law = {"backbone": "synthetic_lm_law", "vocab_size": args.vocab, "states": args.states}

    def tokenizer(side):
        return {"name": "synthetic_lm", "side": side, "vocab_size": args.vocab, "split_tokens": args.split}

    def cross(match, unplaced="renormalize"):
        return {"backbone": "cross_tokenizer", "teacher": dict(law), "match": match, "unplaced": unplaced,
                "teacher_tokenizer": tokenizer("teacher"), "student_tokenizer": tokenizer("student")}

    ce, kd = {"name": "ce"}, {"name": "kd"}
    return {"no teacher": (None, [ce]),
            "same tokenizer": ({**law, "split_tokens": args.split}, [ce, kd]),
            "cross prefix": (cross("prefix"), [ce, kd]),
            "cross exact": (cross("exact"), [ce, kd]),
            "cross exact, spread": (cross("exact", "spread"), [ce, kd]),
            "uld": (cross("none"), [ce, {"name": "uld"}])}


def config(args, teacher, loss, seed) -> dict:
    conf = {"run": {"seed": seed, "epochs": args.epochs, "batch_size": 32, "progress": "off",
                    "evaluate_teacher": False},
            "data": {"name": "synthetic_lm", "n": args.n, "length": args.length, "vocab_size": args.vocab,
                     "states": args.states, "split_tokens": args.split},
            "student": {"backbone": "hf", "config": dict(STUDENT)},
            "optim": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0}, "loss": loss}
    if teacher is not None:
        conf["teacher"] = teacher
    return conf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--split", type=int, default=8)
    parser.add_argument("--states", type=int, default=8)
    parser.add_argument("--length", type=int, default=16)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    data = kdcore.create("dataset", "synthetic_lm", n=args.n, length=args.length, vocab_size=args.vocab,
                         states=args.states, split_tokens=args.split)
    print(f"synthetic_lm: {args.vocab} tokens, {args.split} split in two; student vocabulary "
          f"{data.num_classes}; true test NLL {data.meta['true_nll']:.3f}; {args.epochs} epochs of "
          f"{len(data.train)} sequences; seeds {seeds}")
    print("| method | test KL to the truth (mean ± sd) | per seed | s per run |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as root:
        for name, (teacher, loss) in methods(args).items():
            kls, times = [], []
            for seed in seeds:
                start = time.perf_counter()
                out = Path(root) / f"{name.replace(' ', '_')}_{seed}"
                kls.append(kdcore.train(config(args, teacher, loss, seed), out, quiet=True)["test_kl"])
                times.append(time.perf_counter() - start)
            sd = statistics.stdev(kls) if len(kls) > 1 else 0.0
            print(f"| {name} | {statistics.mean(kls):.4f} ± {sd:.4f} | {', '.join(f'{k:.4f}' for k in kls)} "
                  f"| {statistics.mean(times):.1f} |", flush=True)


if __name__ == "__main__":
    main()
