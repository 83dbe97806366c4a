"""Weights of the reference CIFAR zoo (CRD's RepDistiller, DKD's mdistiller) for this zoo.

The papers distil from published teachers (e.g. RepDistiller's
``resnet32x4_vanilla/ckpt_epoch_240.pth``, a dict with ``"model"``). Their
architectures are the ones registered here (same layers, same order, same
shapes; only the attribute names differ), so :func:`convert_zoo_state_dict`
pairs the two state dicts entry by entry, checking every shape, and
``kdcore vision-import`` writes the result as a checkpoint that
``[teacher] checkpoint = ...`` loads.

Pairing ignores BatchNorm's ``num_batches_tracked`` counters (absent from
state dicts saved by old PyTorch versions); where the source has them they are
copied, otherwise they start at 0 (they only matter for BN momentum ``None``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdcore.common.errors import ConfigError
from kdcore_vision.zoo import CIFAR_MODELS

COUNTER = "num_batches_tracked"


def _strip_wrappers(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Tensors of ``state`` without a DataParallel/DDP ``module.`` prefix."""
    out = {}
    for k, v in state.items():
        if isinstance(v, Tensor):
            out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def convert_zoo_state_dict(name: str, state: Mapping[str, Any]) -> dict[str, Tensor]:
    """A state dict of the reference zoo's model ``name`` renamed for ``create("backbone", name)``.

    ``state`` may be the checkpoint dict itself (its ``"model"`` or ``"state_dict"``
    entry is used). ``num_classes`` is read from the classifier's shape. Raises
    :class:`kdcore.ConfigError` when the entries do not pair up shape for shape.
    """
    if name not in CIFAR_MODELS:
        raise ConfigError(f"backbone: {name!r} is not a CIFAR zoo model ({', '.join(sorted(CIFAR_MODELS))})")
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
    tensors = _strip_wrappers(state)
    source = {k: v for k, v in tensors.items() if not k.endswith(COUNTER)}
    if not source:
        raise ConfigError("checkpoint: holds no tensors")
    num_classes = next(reversed(source.values())).shape[0]  # the classifier's bias
    with torch.device("meta"):
        target = CIFAR_MODELS[name](num_classes=num_classes).state_dict()
    keys = [k for k in target if not k.endswith(COUNTER)]
    if len(keys) != len(source):
        raise ConfigError(f"checkpoint: {len(source)} tensors, but {name} with {num_classes} classes has "
                          f"{len(keys)} (not a reference-zoo {name}?)")
    out: dict[str, Tensor] = {}
    prefixes: dict[str, str] = {}
    for ours, (theirs, value) in zip(keys, source.items()):
        if tuple(value.shape) != tuple(target[ours].shape):
            raise ConfigError(f"checkpoint: {theirs} has shape {tuple(value.shape)}, but {name}'s {ours} "
                              f"needs {tuple(target[ours].shape)} (not a reference-zoo {name}?)")
        out[ours] = value
        prefixes[ours.rpartition(".")[0]] = theirs.rpartition(".")[0]
    for ours in target:
        if ours.endswith(COUNTER):
            module = ours.rpartition(".")[0]
            theirs = f"{prefixes.get(module, '')}.{COUNTER}"
            out[ours] = tensors.get(theirs, torch.zeros((), dtype=torch.long))
    return {k: out[k] for k in target}


def add_import_command(cli: Any) -> None:
    """Add ``vision-import`` to the ``kdcore`` subcommands."""
    p = cli.add_parser("vision-import", help="convert a RepDistiller / mdistiller CIFAR checkpoint "
                                             "into a kdcore checkpoint",
                       description="Rename the weights of a reference-zoo CIFAR model (CRD's RepDistiller, "
                                   "DKD's mdistiller) for the kdcore-vision backbone of the same name; the "
                                   "output loads with [teacher] checkpoint = OUT.")
    p.add_argument("source", metavar="SRC.pth", help="the reference checkpoint (e.g. ckpt_epoch_240.pth)")
    p.add_argument("--backbone", required=True, choices=sorted(CIFAR_MODELS), metavar="NAME",
                   help="the zoo model it holds (e.g. resnet32x4)")
    p.add_argument("--out", required=True, metavar="OUT.pt", help="where to write the kdcore checkpoint")
    p.set_defaults(handler=run_import_command)


def run_import_command(args: argparse.Namespace) -> int:
    from kdcore.common import atomic_torch_save

    path = Path(args.source)
    if not path.is_file():
        raise ConfigError(f"source: file not found: {path}")
    try:  # weights only: plain dicts of tensors and numbers, as the reference repositories save
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"source: cannot load {path} with weights_only=True ({type(exc).__name__})") from None
    if not isinstance(obj, Mapping):
        raise ConfigError(f"source: {path} holds no state dict")
    state = convert_zoo_state_dict(args.backbone, obj)
    out = Path(args.out)
    atomic_torch_save({"model": state, "backbone": args.backbone, "source": str(path)}, out)
    n = sum(v.numel() for k, v in state.items() if not k.endswith(COUNTER) and "running_" not in k)
    print(f"{args.backbone}: {len(state)} tensors ({n:,} parameters) -> {out}")
    return 0
