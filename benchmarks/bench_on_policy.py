"""An on-policy step (kdcore-lm's ``on_policy`` batch policy) vs an off-policy step.

Tiny llama student and teacher on ``synthetic_lm`` rows of ``--length`` tokens;
the on-policy step keeps the first ``--prompt`` tokens of every row and
generates the rest (``max_new_tokens = length - prompt``, no EOS), so both
steps train on sequences of the same length with ce + kd. The two steps
alternate (which one goes first alternating too) on the same batches, every
step timed on its own (and an off-policy step on the generated rows, which
carry an attention mask, to split the on-policy step). Reported: the ratio on-policy / off-policy of the
median steps, the generation's share of the on-policy step (the policy call
timed alone), and the generation against ``transformers``' own
``model.generate`` (sampling, the same number of new tokens, key/value cache)
as the plain baseline, interleaved the same way.

    python benchmarks/bench_on_policy.py [--steps 30] [--batch 16] [--length 32] [--prompt 8]
        [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from kdcore import create
from kdcore.engine import build_trainer
from kdcore.losses.policy import StepContext

MODEL = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}


def config(args, ckpt: str, lmbda: float) -> dict:
    return {
        "run": {"seed": 0, "epochs": 1, "batch_size": args.batch, "device": args.device, "progress": "off",
                "deterministic": False},
        "data": {"name": "synthetic_lm", "n": 4 * args.batch, "length": args.length, "vocab_size": 256},
        "teacher": {"backbone": "hf", "config": dict(MODEL), "checkpoint": ckpt},
        "student": {"backbone": "hf", "config": {**MODEL, "hidden_size": 32, "intermediate_size": 64}},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
        "loss": [{"name": "ce", "weight": 0.5}, {"name": "kd", "temperature": 1.0, "weight": 0.5}],
        "batch_policy": {"name": "on_policy", "lmbda": lmbda, "prompt_length": args.prompt,
                         "max_new_tokens": args.length - args.prompt},
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher = create("backbone", "hf", num_classes=256, in_features=args.length, config=dict(MODEL))
    ckpt = os.path.join(tempfile.mkdtemp(), "teacher.pt")
    torch.save({"model": teacher.state_dict()}, ckpt)  # random weights are fine for timing
    on = build_trainer(config(args, ckpt, 1.0), None, quiet=True)
    off = build_trainer(config(args, ckpt, 0.0), None, quiet=True)
    dev = on.device
    batches = list(on.batches.epoch(torch.Generator().manual_seed(0)))
    new_tokens = args.length - args.prompt
    student = on.student.model  # the transformers model inside the hf backbone

    def hf_generate(batch):
        ids = batch.inputs["input_ids"][:, :args.prompt]
        was = student.training
        student.eval()
        with torch.no_grad():
            student.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=1.0,
                             top_k=0, temperature=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=0, eos_token_id=None)
        student.train(was)

    def ours_generate(batch):
        ctx = StepContext(on.student, on.teacher, on.progress(), 0, dev)
        return on.batch_policy(batch, ctx)

    made = [ours_generate(b) for b in batches]  # generated batches, for the off-policy step on them
    times = {"on": [], "off": [], "off_made": [], "gen": [], "hf_gen": []}
    for i in range(args.steps + 2):  # the first two rounds warm up
        batch = batches[i % len(batches)]
        pairs = [("on", lambda: on.train_step(batch)), ("off", lambda: off.train_step(batch)),
                 ("off_made", lambda: off.train_step(made[i % len(batches)])),
                 ("gen", lambda: ours_generate(batch)), ("hf_gen", lambda: hf_generate(batch))]
        if i % 2:
            pairs.reverse()
        for name, fn in pairs:
            t = timed(fn, dev)
            if i >= 2:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device {dev.type}, threads {args.threads}, batch {args.batch}, length {args.length}, "
          f"prompt {args.prompt}, {new_tokens} new tokens, {args.steps} interleaved rounds")
    for k, label in (("off", "off-policy step"), ("off_made", "off-policy step, generated rows"),
                     ("on", "on-policy step"), ("gen", "generation (policy call)"),
                     ("hf_gen", "transformers generate")):
        print(f"  {label:32s} median {med[k] * 1e3:8.2f} ms")
    print(f"on-policy / off-policy step: {med['on'] / med['off']:.2f}x")
    print(f"generation share of the on-policy step: {med['gen'] / med['on']:.2f}")
    print(f"generation, ours / transformers generate: {med['gen'] / med['hf_gen']:.2f}x")


if __name__ == "__main__":
    main()
