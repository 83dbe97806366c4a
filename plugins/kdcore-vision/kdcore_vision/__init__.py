"""kdcore-vision: image backbones with a uniform feature interface, and image datasets.

Backbones (``create("backbone", name, num_classes=K)``): the CIFAR KD zoo
(:data:`kdcore_vision.zoo.CIFAR_MODELS`) and every torchvision classifier as
``tv.NAME``. All are called ``model(x)`` -> logits or
``model(x, return_features=True)`` -> ``(logits, Features)``; see
:mod:`kdcore_vision.features`. Datasets: ``cifar10``, ``cifar100``,
``imagefolder``, ``digits`` (offline). Published reference-zoo weights (RepDistiller,
mdistiller): :func:`convert_zoo_state_dict`, ``kdcore vision-import``.
"""

from kdcore_vision.features import Backbone, Features, feature_shapes
from kdcore_vision.zoo import CIFAR_MODELS
from kdcore_vision.zoo_checkpoints import convert_zoo_state_dict

__version__ = "0.1.0"
__all__ = ["Backbone", "Features", "feature_shapes", "CIFAR_MODELS", "convert_zoo_state_dict", "__version__"]
