"""Peak memory and time of a language-model distillation step: fused kd / jsd against full logits (CPU).

One step of a tiny Llama-style student (kdcore-lm's ``hf`` backbone, random
weights) distilling from a frozen tiny Llama teacher with a large vocabulary:
teacher forward (no gradient), student forward and backward, with
``ce + kd`` where kd uses the KL (``kl``) or kdcore-divergences' ``jsd``.
"dense" computes both models' ``[B, T, V]`` logits and calls the losses on them
(the plain way); "fused C" hands the losses ``kdcore.Outputs(hidden, head)`` with
``chunk_size = C`` (docs/fused.md), so no full logits tensor exists.

Memory: the peak tensor memory of one step beyond what was live before it
(kdcore's ``run.measure_memory``: the profiler's record of every allocation),
in MiB and in units of one float32 ``[B*T, V]`` logits tensor; "loss" is that
peak less the peak of the same step with a loss on the student's hidden states
alone ("none": the models' activations and gradients, no vocabulary), i.e.
what the losses over the vocabulary add. Time: ``--repeats``
steps of every variant in this process, interleaved with the order
alternating; medians, and the ratio to the dense step of the same divergence.

    .venv/bin/python benchmarks/bench_lm.py [--vocab 32000] [--hidden 64] [--seq 128] [--batch 8]
        [--chunks 128,64,32] [--divergences kl,jsd] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kdcore
from kdcore.engine.memory import MEASURED_STEP, StepMemory


def models(args):
    base = {"model_type": "llama", "hidden_size": args.hidden, "intermediate_size": 2 * args.hidden,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    torch.manual_seed(0)
    teacher = kdcore.create("backbone", "hf", num_classes=args.vocab, in_features=args.seq, config=base,
                            fused=True).eval().requires_grad_(False)
    student = kdcore.create("backbone", "hf", num_classes=args.vocab, in_features=args.seq,
                            config={**base, "num_hidden_layers": 1}, fused=True)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    return student, teacher, {"input_ids": ids[:, :-1]}, ids[:, 1:].contiguous()


def step(variant: str, divergence: str, student, teacher, inputs, target) -> None:
    """One forward + backward: ``ce + kd`` with full logits ("dense") or from
    ``Outputs(hidden, head)`` ("fused C": ``chunk_size = C``), or ("none") the same
    forwards and a loss on the student's hidden states alone, which never touches
    the vocabulary."""
    student.zero_grad(set_to_none=True)
    fused = variant.startswith("fused")
    chunk = int(variant.split()[1]) if fused else None
    ce = kdcore.create("loss", "ce", **({"chunk_size": chunk} if fused else {}))
    kd = kdcore.create("loss", "kd", divergence=divergence, **({"chunk_size": chunk} if fused else {}))
    with torch.no_grad():
        t = teacher(**inputs)
    s = student(**inputs)
    if variant == "none":
        s.hidden.float().square().mean().backward()
        return
    if not fused:
        s, t = s.logits, t.logits
    (ce(s, None, target) + kd(s, t, target)).backward()


def peak_mib(variant: str, divergence: str, args, inputs) -> float:
    """The step's peak tensor memory beyond what was live before it (kdcore's
    ``run.measure_memory``: the profiler's allocation record)."""
    memory = StepMemory(torch.device("cpu"), enabled=True)
    with memory.around(MEASURED_STEP):
        step(variant, divergence, *inputs)
    return memory.peak_mib


def times(args, cases: list[tuple[str, str]], inputs) -> dict[tuple[str, str], float]:
    runs: dict[tuple[str, str], list[float]] = {c: [] for c in cases}
    for rep in range(args.repeats):
        for case in cases if rep % 2 == 0 else cases[::-1]:
            t0 = time.perf_counter()
            step(case[0], case[1], *inputs)
            runs[case].append(time.perf_counter() - t0)
    return {c: statistics.median(r) for c, r in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunks", default="128,64,32", help="the fused variants' chunk sizes")
    ap.add_argument("--divergences", default="kl,jsd")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    divergences = [d for d in args.divergences.split(",") if d in kdcore.available("divergence")]
    cases = [(v, d) for d in divergences for v in ["dense"] + [f"fused {c}" for c in args.chunks.split(",")]]
    inputs = models(args)
    step("fused 16", divergences[0], *inputs)  # warm-up: the kernels, the head's gradient
    none = peak_mib("none", divergences[0], args, inputs)
    mem = {c: peak_mib(*c, args, inputs) for c in cases}
    secs = times(args, cases, inputs)
    logits = args.batch * args.seq * args.vocab * 4 / 2**20
    print(f"ce + kd step, tiny llama student/teacher, batch {args.batch} x seq {args.seq} x vocabulary "
          f"{args.vocab}, hidden {args.hidden}, {args.threads} thread(s), "
          f"median of {args.repeats} interleaved steps")
    print(f"logits tensor [{args.batch * args.seq}, {args.vocab}] float32: {logits:.1f} MiB; the same step "
          f"without the vocabulary (a loss on the student's hidden states): peak {none:.1f} MiB")
    print(f"{'divergence':11}{'path':10}{'peak MiB':>10}{'logits tensors':>16}{'loss MiB':>10}"
          f"{'loss tensors':>14}{'memory / dense':>16}{'time s':>9}{'time / dense':>14}")
    for v, d in cases:
        m, dense = mem[(v, d)], mem[("dense", d)]
        print(f"{d:11}{v:10}{m:10.1f}{m / logits:16.3f}{m - none:10.1f}{(m - none) / logits:14.3f}"
              f"{m / dense:16.3f}{secs[(v, d)]:9.3f}{secs[(v, d)] / secs[('dense', d)]:14.3f}")


if __name__ == "__main__":
    main()
