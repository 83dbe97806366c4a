"""kdcore-lm: language-model distillation on Hugging Face causal LMs.

Registers the backbone ``hf`` and the datasets ``text`` and ``synthetic_lm``;
:class:`KDTrainer` (a ``transformers.Trainer`` that distils with kdcore's
loss terms) is imported on first use, so loading the plugin does not import
``transformers``.
"""

from __future__ import annotations

__all__ = ["KDTrainer", "HFCausalLM", "LMHead", "hf", "lm_head_of", "synthetic_lm", "text", "evaluate_lm",
           "kl_to_truth"]

_LAZY = {
    "KDTrainer": "kdcore_lm.trainer",
    "HFCausalLM": "kdcore_lm.hf",
    "LMHead": "kdcore_lm.hf",
    "hf": "kdcore_lm.hf",
    "lm_head_of": "kdcore_lm.hf",
    "synthetic_lm": "kdcore_lm.synthetic",
    "text": "kdcore_lm.text",
    "evaluate_lm": "kdcore_lm.metrics",
    "kl_to_truth": "kdcore_lm.metrics",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdcore_lm' has no attribute {name!r}")
