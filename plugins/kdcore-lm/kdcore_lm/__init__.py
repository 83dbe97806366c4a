"""kdcore-lm: language-model distillation on Hugging Face causal LMs.

Registers the backbones ``hf``, ``cross_tokenizer`` (a teacher with another
tokenizer) and ``synthetic_lm_law``, the datasets ``text`` and ``synthetic_lm``,
the loss ``uld`` (cross-tokenizer distillation) and the batch policy
``on_policy`` (on-policy and sequence-level distillation);
:class:`KDTrainer` (a ``transformers.Trainer`` that distils with kdcore's
loss terms) is imported on first use, so loading the plugin does not import
``transformers``.
"""

from __future__ import annotations

__all__ = ["KDTrainer", "HFCausalLM", "LMHead", "OnPolicy", "hf", "lm_head_of", "synthetic_lm", "text",
           "evaluate_lm", "kl_to_truth", "generate", "completion_batch", "ULD"]

_LAZY = {
    "KDTrainer": "kdcore_lm.trainer",
    "HFCausalLM": "kdcore_lm.hf",
    "LMHead": "kdcore_lm.hf",
    "hf": "kdcore_lm.hf",
    "lm_head_of": "kdcore_lm.hf",
    "OnPolicy": "kdcore_lm.on_policy",
    "generate": "kdcore_lm.generation",
    "completion_batch": "kdcore_lm.generation",
    "synthetic_lm": "kdcore_lm.synthetic",
    "text": "kdcore_lm.text",
    "evaluate_lm": "kdcore_lm.metrics",
    "kl_to_truth": "kdcore_lm.metrics",
    "ULD": "kdcore_lm.uld",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdcore_lm' has no attribute {name!r}")
