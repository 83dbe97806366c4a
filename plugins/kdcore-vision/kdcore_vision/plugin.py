"""Hook implementations of kdcore-vision (entry point ``vision``)."""

from __future__ import annotations

from kdcore import hookimpl
from kdcore_vision import cifar, digits
from kdcore_vision.torchvision_models import CLASSIFIERS, torchvision_factory
from kdcore_vision.zoo import CIFAR_MODELS
from kdcore_vision.zoo_checkpoints import add_import_command


@hookimpl
def register_backbones(register):
    for name, factory in CIFAR_MODELS.items():
        register(name, factory)
    for name in CLASSIFIERS:
        register(f"tv.{name}", torchvision_factory(name))


@hookimpl
def register_datasets(register):
    register("cifar10", cifar.cifar10)
    register("cifar100", cifar.cifar100)
    register("imagefolder", "kdcore_vision.imagefolder:imagefolder")  # lazy: torchvision loads when used
    register("digits", digits.digits)


@hookimpl
def register_commands(cli):
    add_import_command(cli)
