"""Checks and inputs for testing kdcore components (for plugin authors).

The conventions of every component kind as executable checks, so that a
plugin's tests need only its own mathematics (its float64 reference)::

    import kdcore
    from kdcore.testing import check_component, check_logit_loss

    def test_my_loss_follows_the_conventions():
        check_logit_loss(kdcore.create("loss", "my_loss"))

    def test_every_component_of_mine():
        for kind in ("loss", "divergence"):
            for name in components(kind, plugin="mine"):
                check_component(kind, name)

One check per kind: :func:`check_loss` (:func:`check_logit_loss` for logit
losses, per-row and batch-level; :func:`check_outputs_loss` for
``uses_outputs`` terms), :func:`check_divergence`, :func:`check_transform`,
:func:`check_schedule`, :func:`check_weighting` (:func:`check_scheduler`
picks one of these two), :func:`check_backbone`, :func:`check_dataset`; and
:func:`check_component` for a registered component by kind and name. Each
check runs named sub-checks; a component declares those that do not apply
to it in ``testing_skips`` (:mod:`kdcore.testing.skips`), and a factory with
required parameters gives the checks some in ``testing_params``.
:mod:`kdcore.testing.pytest_plugin` parametrises a test over a plugin's
components. :func:`extreme_batches` is a hypothesis strategy (hypothesis is
needed only for it) of float32 inputs that break naive implementations.
:func:`train_interrupted` stops a run at an epoch and resumes it, for resume
tests of stateful components.

Layer 5 (beside :mod:`kdcore.cli`): may import every layer below; nothing in kdcore imports it.
"""

from kdcore.testing.backbones import check_backbone
from kdcore.testing.components import CHECKED_KINDS, check_component, components, testing_params
from kdcore.testing.datasets import check_dataset
from kdcore.testing.distributions import check_divergence
from kdcore.testing.inputs import (assert_finite_with_grads, extreme_batches, random_logits, random_targets,
                                   value_and_grad)
from kdcore.testing.losses import check_logit_loss, check_loss, check_outputs_loss
from kdcore.testing.models import TinyConvNet
from kdcore.testing.runs import train_interrupted
from kdcore.testing.schedules import check_schedule, check_scheduler, check_weighting, progress_grid
from kdcore.testing.transforms import check_transform
from kdcore.testing.skips import CHECKS

__all__ = ["random_logits", "random_targets", "value_and_grad", "assert_finite_with_grads", "extreme_batches",
           "check_loss", "check_logit_loss", "check_outputs_loss", "check_divergence", "check_transform",
           "check_schedule", "check_weighting", "check_scheduler", "check_backbone", "check_dataset",
           "check_component", "components", "CHECKED_KINDS", "testing_params", "progress_grid", "TinyConvNet", "CHECKS",
           "train_interrupted"]
