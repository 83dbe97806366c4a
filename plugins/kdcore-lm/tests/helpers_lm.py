"""Shared by the kdcore-lm tests (imported by file path): a tokenizer built here (never
downloaded), tiny configs, JSONL writing, KDTrainer's dataset and arguments for runs
compared with ``kdcore train``."""

from __future__ import annotations

import json

import torch


WORDS = ("the a cat dog sat ran on mat park is big small red blue what where who why how answer question "
         "tell me about please thanks yes no one two three four five good bad day night").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]

#: tiny architectures built from configs (random weights)
TINY = {
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4},
    "gemma2": {"model_type": "gemma2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
               "final_logit_softcapping": 5.0},
}


def build_tokenizer(directory):
    """A WordLevel tokenizer over WORDS with BOS/EOS/PAD and a chat template, saved as a
    PreTrainedTokenizerFast in ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="[PAD]",
                                   unk_token="[UNK]", additional_special_tokens=SPECIALS[4:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return fast


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def train_teacher(out, data: dict, model: dict) -> str:
    """An ``hf`` teacher of config ``model`` trained one epoch on ``data`` into ``out``; its best.pt."""
    import kdcore

    conf = {"run": {"seed": 0, "epochs": 1, "batch_size": 16, "progress": "off"}, "data": dict(data),
            "student": {"backbone": "hf", "config": dict(model)},
            "optim": {"name": "adamw", "lr": 1e-2}, "loss": [{"name": "ce"}]}
    kdcore.train(conf, out, quiet=True)
    return str(out / "checkpoints" / "best.pt")


class TrainerRows(torch.utils.data.Dataset):
    """Hugging Face samples in order: each input column (``input_ids``, ``attention_mask``
    where given) and kdcore's shifted ``target``."""

    def __init__(self, inputs: dict, target):
        self.inputs, self.target = inputs, target

    def __len__(self):
        return len(self.target)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.inputs.items()}, "target": self.target[i]}


def trainer_args(out, *, batch: int, accumulate: int, steps: int, seed: int, **kw):
    """``TrainingArguments`` of a kdcore run with ``run.batch_size = batch``, ``run.accumulate``,
    ``run.max_steps = steps`` and ``run.seed``: AdamW at a constant rate of 5e-3 without
    weight decay, on the CPU, the batches in order, every step logged, nothing saved;
    ``kw`` replaces any of these."""
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), per_device_train_batch_size=batch // accumulate,
                gradient_accumulation_steps=accumulate, max_steps=steps, learning_rate=5e-3, weight_decay=0.0,
                lr_scheduler_type="constant", optim="adamw_torch", seed=seed, use_cpu=True, report_to="none",
                save_strategy="no", logging_steps=1, disable_tqdm=True, train_sampling_strategy="sequential")
    return TrainingArguments(**{**base, **kw})


def random_teacher(directory, vocab: int, length: int, config: dict) -> str:
    """A kdcore ``hf`` teacher with random weights (seed 0) saved as a checkpoint in
    ``directory``; its path."""
    import kdcore

    torch.manual_seed(0)
    teacher = kdcore.create("backbone", "hf", num_classes=vocab, in_features=length, config=dict(config))
    path = directory / "teacher.pt"
    torch.save({"model": teacher.state_dict()}, path)
    return str(path)
