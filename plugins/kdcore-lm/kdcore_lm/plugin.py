"""kdcore hook implementations of the ``lm`` plugin (nothing here imports transformers)."""

from kdcore import hookimpl

from kdcore_lm.cross import cross_tokenizer
from kdcore_lm.hf import hf
from kdcore_lm.on_policy import OnPolicy
from kdcore_lm.synthetic import synthetic_lm, synthetic_lm_law
from kdcore_lm.text import text
from kdcore_lm.uld import ULD


@hookimpl
def register_backbones(register):
    register("hf", hf)
    register("cross_tokenizer", cross_tokenizer)
    register("synthetic_lm_law", synthetic_lm_law)


@hookimpl
def register_losses(register):
    register("uld", ULD)


@hookimpl
def register_datasets(register):
    register("synthetic_lm", synthetic_lm)
    register("text", text)


@hookimpl
def register_batch_policies(register):
    register("on_policy", OnPolicy)


@hookimpl
def register_demos(register):
    from kdcore_lm.demo import run_demo

    register("lm", run_demo)
