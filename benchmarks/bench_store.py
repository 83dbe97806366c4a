"""Teacher signals: store size and fidelity, training from a store, and the teacher cache (CPU).

``fidelity``: bytes per position and the KL between the full teacher and what
a store keeps, for k in {8, 32, 128} and each value coding, on ``synthetic_lm``
(vocabulary 256). The teacher is the language's exact next-token law (the
val split's ``posterior``: a teacher as good as any can be, and as peaked as
the language). Two KLs per position, means over positions:

- ``kl_buckets``: KL(exact k + 1 buckets || stored k + 1 buckets), what the
  coding of the values loses (0 for float32 up to rounding);
- ``kl_full``: KL(p || p_hat) over the whole vocabulary, with p_hat the stored
  top-k and the tail mass spread evenly over the other ids: what a store
  keeps of the teacher at all.

Record sizes for larger vocabularies (32000, 128256) follow from the layout.

``speed``: one optimizer step of ce + kd on ``synthetic_lm`` with hf llama
models (kdcore-lm), the teacher about 8x the student's parameters, its
outputs (a) from the running teacher, (b) from a store (k = 32, uint8),
(c) from a store with every id kept (float32): median step time, interleaved
in one process, and the growth of the peak resident set during the steps, in
a fresh process per variant with ``MALLOC_MMAP_THRESHOLD_`` fixed (as in
bench_fused.py), the peak (VmHWM, reset through ``/proc/self/clear_refs``) less
the resident set before the run is built (models, data, store pages
read, the steps' tensors). Ratios to the running teacher.

``cache``: epoch time of the same run with ``[teacher] cache = true`` against
without, epochs interleaved (the first epoch fills the cache; the ratio is of
the later epochs' medians, and of whole runs of ``--epochs`` epochs).

    .venv/bin/python benchmarks/bench_store.py fidelity|speed|cache [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import kdcore
from kdcore.engine import build_trainer
from kdcore.engine.batches import epoch_generator
from kdcore.engine.capture import capture
from kdcore.signals.records import VALUE_CODINGS, choose_layout, decode, encode, top_k

DATA = {"name": "synthetic_lm", "n": 1024, "length": 32, "vocab_size": 256, "states": 24}
LLAMA = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2}
STUDENT = {**LLAMA, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
TEACHER = {**LLAMA, "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2}


def fidelity(args) -> dict:
    data = kdcore.create("dataset", "synthetic_lm", **{k: v for k, v in DATA.items() if k != "name"})
    p = data.val.posterior.double().reshape(-1, DATA["vocab_size"])
    p = p / p.sum(-1, keepdim=True)
    logits = p.log()
    out = {"positions": p.shape[0], "rows": []}
    for k in (8, 32, 128):
        ids, logp, rest = top_k(logits, k)
        exact = torch.cat([logp, rest[:, None]], -1)
        for values in VALUE_CODINGS:
            layout = choose_layout(DATA["vocab_size"], k, values)
            ids2, logp2, rest2 = decode(layout, encode(layout, ids, logp, rest))
            stored = torch.log_softmax(torch.cat([logp2.double(), rest2.double()[:, None]], -1), -1)
            kl_b = (exact.exp() * (exact - stored)).sum(-1).mean().item()
            spread = stored[:, -1:] - torch.log(torch.tensor(float(DATA["vocab_size"] - k), dtype=torch.float64))
            p_hat = spread.expand(-1, DATA["vocab_size"]).clone().scatter(-1, ids2, stored[:, :-1])
            kl_f = (p * (logits - p_hat)).sum(-1).mean().item()
            out["rows"].append({"k": k, "values": values, "ids": layout.ids,
                                "bytes_per_position": layout.record_bytes, "kl_buckets": kl_b, "kl_full": kl_f,
                                "tail_mass_mean": rest.exp().mean().item(),
                                "bytes_v32000": choose_layout(32000, k, values).record_bytes,
                                "bytes_v128256": choose_layout(128256, k, values).record_bytes})
    return out


def _configs(root: Path, epochs: int = 1) -> tuple[dict, Path]:
    torch.manual_seed(0)
    teacher = kdcore.create("backbone", "hf", num_classes=DATA["vocab_size"], in_features=DATA["length"],
                            config=TEACHER)
    ckpt = root / "teacher.pt"
    torch.save(teacher.state_dict(), ckpt)
    conf = {"run": {"seed": 0, "epochs": epochs, "batch_size": 32, "progress": "off", "device": "cpu"},
            "data": dict(DATA),
            "teacher": {"backbone": "hf", "config": TEACHER, "checkpoint": str(ckpt)},
            "student": {"backbone": "hf", "config": STUDENT},
            "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
            "loss": [{"name": "ce"}, {"name": "kd", "temperature": 1.0}]}
    path = root / "online.toml"
    import tomli_w

    path.write_text(tomli_w.dumps(conf))
    return conf, path


def _params(trainer, which) -> int:
    return sum(p.numel() for p in getattr(trainer, which).parameters())


def _variants(root: Path, conf: dict, path: Path) -> dict[str, dict]:
    out = {"online": conf}
    for name, k, values in (("store_k32", 32, "uint8"), ("store_full", DATA["vocab_size"], "float32")):
        capture(path, root / name, top_k=k, values=values, quiet=True)
        c = copy.deepcopy(conf)
        c["teacher"].update(source="store", store=str(root / name))
        out[name] = c
    return out


def _steps(trainer, n: int) -> list[float]:
    times = []
    batches = iter(trainer.batches.epoch(epoch_generator(0, 1)))
    for _ in range(n):
        batch = next(batches)
        t0 = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - t0)
    return times


def speed(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        conf, path = _configs(root)
        variants = _variants(root, conf, path)
        trainers = {k: build_trainer(c, None, quiet=True) for k, c in variants.items()}
        sizes = {"student_params": _params(trainers["online"], "student"),
                 "teacher_params": _params(trainers["online"], "teacher")}
        for t in trainers.values():
            _steps(t, 2)  # warm-up
        times = {k: [] for k in trainers}
        for r in range(args.repeats):
            order = list(trainers) if r % 2 == 0 else list(reversed(trainers))
            for k in order:
                times[k] += _steps(trainers[k], 1)
        med = {k: statistics.median(v) for k, v in times.items()}
        memory = {k: _peak_in_fresh_process(c, args) for k, c in variants.items()}
        return {**sizes, "step_s": med, "step_ratio_to_online": {k: v / med["online"] for k, v in med.items()},
                "peak_growth_mib": memory,
                "peak_ratio_to_online": {k: v / memory["online"] for k, v in memory.items()}}


def _peak_in_fresh_process(conf: dict, args) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run([sys.executable, __file__, "_peak", json.dumps(conf), "--threads", str(args.threads)],
                          capture_output=True, text=True, env=env, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def _peak(args) -> None:
    """(child) The growth of the peak RSS from before the run is built to after 7 steps, MiB
    (the models, the data, the store's pages read and the steps' live tensors)."""
    import transformers  # noqa: F401  (imported before the baseline)

    kdcore.available("loss")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS
    before = _status_kib("VmRSS")
    trainer = build_trainer(json.loads(args.conf), None, quiet=True)
    _steps(trainer, 7)
    print((_status_kib("VmHWM") - before) / 1024)


def _status_kib(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1])


def cache(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        conf, _ = _configs(Path(tmp), epochs=args.epochs)
        cached = copy.deepcopy(conf)
        cached["teacher"]["cache"] = True
        trainers = {"plain": build_trainer(conf, None, quiet=True), "cached": build_trainer(cached, None, quiet=True)}
        sizes = {"student_params": _params(trainers["plain"], "student"),
                 "teacher_params": _params(trainers["plain"], "teacher")}
        epochs = {k: [] for k in trainers}
        for epoch in range(1, args.epochs + 1):
            order = list(trainers) if epoch % 2 else list(reversed(trainers))
            for k in order:
                t = trainers[k]
                t0 = time.perf_counter()
                for batch in t.batches.epoch(epoch_generator(0, epoch)):
                    t.train_step(batch)
                epochs[k].append(time.perf_counter() - t0)
        later = {k: statistics.median(v[1:]) for k, v in epochs.items()}
        whole = {k: sum(v) for k, v in epochs.items()}
        return {**sizes, "epoch_s": epochs, "later_epoch_ratio_cached_to_plain": later["cached"] / later["plain"],
                "whole_run_ratio_cached_to_plain": whole["cached"] / whole["plain"],
                "first_epoch_ratio_cached_to_plain": epochs["cached"][0] / epochs["plain"][0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("fidelity", "speed", "cache", "_peak"))
    ap.add_argument("conf", nargs="?")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "_peak":
        _peak(args)
        return
    result = {"fidelity": fidelity, "speed": speed, "cache": cache}[args.what](args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
