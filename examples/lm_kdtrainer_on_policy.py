"""On-policy distillation inside the Hugging Face Trainer (``kdcore_lm.KDTrainer``).

A small llama teacher learns kdcore's synthetic language (``synthetic_lm``) with
cross-entropy; then a smaller student distils from it with ``kd``, writing the
continuations of each sequence's first 8 tokens itself at a share of the steps
rising from 0.25 to 1 (the batch policy ``on_policy``, as
``examples/lm_on_policy.toml`` does under ``kdcore train``). Prints the
test NLL of the teacher and of the student, and the language's own (what a
perfect model scores). CPU, about a minute and a half:

    python examples/lm_kdtrainer_on_policy.py --steps 300 --out runs/kdtrainer_on_policy
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments

import kdcore
from kdcore_lm import KDTrainer

VOCAB, LENGTH = 256, 32


class Sequences(torch.utils.data.Dataset):
    """A ``synthetic_lm`` split as Hugging Face samples: ``input_ids`` and kdcore's shifted ``target``."""

    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        inputs, target = self.split[i]
        return {"input_ids": inputs["input_ids"], "target": target}


def llama(hidden: int, layers: int, seed: int):
    """A llama with random weights over the synthetic vocabulary."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH))


def arguments(out: str, steps: int) -> TrainingArguments:
    return TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=32, learning_rate=3e-3,
                             lr_scheduler_type="constant", weight_decay=0.0, seed=1, use_cpu=True, report_to="none",
                             save_strategy="no", logging_steps=max(steps // 5, 1), disable_tqdm=True)


def nll(model, split, out: str) -> float:
    """The model's mean next-token NLL on ``split``."""
    return KDTrainer(model=model, losses=["ce"], args=arguments(out, 1), eval_dataset=split).evaluate()["eval_loss"]


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each model")
    parser.add_argument("--n", type=int, default=4096, help="sequences of the synthetic language")
    parser.add_argument("--out", default="runs/kdtrainer_on_policy")
    a = parser.parse_args(argv)
    data = kdcore.create("dataset", "synthetic_lm", n=a.n, length=LENGTH, vocab_size=VOCAB, states=24)
    train, test = Sequences(data.train), Sequences(data.test)

    teacher = llama(64, 2, seed=0)
    KDTrainer(model=teacher, losses=["ce"], args=arguments(f"{a.out}/teacher", a.steps), train_dataset=train).train()

    student = llama(32, 1, seed=1)
    trainer = KDTrainer(
        model=student, teacher=teacher, losses=[{"name": "kd", "temperature": 1.0}],
        batch_policy={"name": "on_policy", "lmbda": 1.0, "schedule": {"name": "linear", "start": 0.25, "end": 1.0},
                      "prompt_length": 8, "max_new_tokens": 24, "temperature": 1.0},
        args=arguments(f"{a.out}/student", a.steps), train_dataset=train)
    trainer.train()
    result = {"teacher_test_nll": nll(teacher, test, f"{a.out}/eval"),
              "student_test_nll": nll(student, test, f"{a.out}/eval"), "true_nll": float(data.meta["true_nll"])}
    print(f"test NLL: teacher {result['teacher_test_nll']:.3f}, student {result['student_test_nll']:.3f}, "
          f"the language {result['true_nll']:.3f}")
    return result


if __name__ == "__main__":
    main()
