"""The hook specifications of kdcore (pluggy project ``kdcore``).

Each registration hook receives a ``register(name, factory)`` callable bound to
the calling plugin, so every component knows which plugin provided it.
A factory is a class or function called with keyword parameters.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("kdcore")
hookimpl = pluggy.HookimplMarker("kdcore")


@hookspec
def register_losses(register):
    """Register loss terms: ``register("kd", KDLoss)``."""


@hookspec
def register_divergences(register):
    """Register divergences ``div(teacher_logp, student_logp) -> per-row values``."""


@hookspec
def register_transforms(register):
    """Register transforms: ``transform(logp, target) -> logp`` on each side the
    transform's ``side`` names (``"teacher"`` when absent, ``"student"``, ``"both"``),
    or ``pair(teacher_logp, student_logp, target) -> (teacher, student[, scale])``
    for one that couples the sides. An ``nn.Module`` transform trains and
    checkpoints with its loss term; ``set_progress(progress)`` is called before
    each step where defined (docs/methods/transforms.md)."""


@hookspec
def register_schedulers(register):
    """Register loss-weight schedulers (time-based or gradient-aware)."""


@hookspec
def register_backbones(register):
    """Register models: ``factory(num_classes=K, ...) -> torch.nn.Module``."""


@hookspec
def register_datasets(register):
    """Register datasets: ``factory(**params) -> kdcore.data.DataSplits``."""


@hookspec
def register_batch_policies(register):
    """Register batch policies ``policy(batch, context) -> batch``, called once per
    training step before its forward passes (see :mod:`kdcore.losses.policy`)."""


@hookspec
def register_demos(register):
    """Register demos for ``kdcore demo NAME``: ``register("lm", run)`` with
    ``run(out_dir, *, quiet) -> rows``, presented with :func:`kdcore.cli.demo.present`."""


@hookspec
def register_commands(cli):
    """Add ``kdcore`` subcommands: ``cli.add_parser(name, help=...)`` returns an
    argparse parser; set its ``handler`` default to a function ``(args) -> int``."""


#: hook name -> registry kind, for the registration hooks
KIND_OF_HOOK = {
    "register_losses": "loss",
    "register_divergences": "divergence",
    "register_transforms": "transform",
    "register_schedulers": "scheduler",
    "register_backbones": "backbone",
    "register_datasets": "dataset",
    "register_batch_policies": "batch_policy",
}
KINDS = tuple(KIND_OF_HOOK.values())
