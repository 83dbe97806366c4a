"""Checks for backbones: ``factory(num_classes=K, ...) -> torch.nn.Module``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from kdcore.engine.taps import Tapping, check_taps
from kdcore.losses.outputs import Outputs
from kdcore.testing.inputs import close
from kdcore.testing.skips import skipped


def _takes(factory: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def default_taps(model: nn.Module) -> list[str]:
    """The paths the ``taps`` check hooks: the model's declared ``feature_taps``
    (a mapping with ``stages`` / ``pooled``, or an object with those attributes),
    else its direct children."""
    declared = getattr(model, "feature_taps", None)
    if declared is not None:
        stages = declared["stages"] if isinstance(declared, dict) else declared.stages
        pooled = declared["pooled"] if isinstance(declared, dict) else declared.pooled
        return list(dict.fromkeys([*stages, pooled]))
    return [name for name, _ in model.named_children()]


def check_backbone(factory: Callable[..., nn.Module], num_classes: int = 5,
                   input_shape: Sequence[int] | None = None, batch: int = 2, device: str = "cpu",
                   params: dict[str, Any] | None = None, skip: Iterable[str] = ()) -> nn.Module:
    """Assert that ``factory(num_classes=K, **params)`` builds a model that the
    engine can train. The input is ``[batch, *input_shape]``: ``input_shape``
    defaults to the factory's ``testing_input_shape`` attribute, else ``(8,)``
    (with ``in_features=8``) for a factory that takes ``in_features``, else
    ``(3, 32, 32)``. ``device="meta"`` builds the model without memory and
    checks only shapes (``num_classes``, ``taps``). Returns the model built
    first. Sub-checks:

    - ``num_classes``: an ``nn.Module`` whose output (a tensor or
      :class:`kdcore.Outputs`) has logits ``[batch, K]``;
    - ``batch_rows``: in eval mode, each row's logits do not depend on the
      other rows of the batch;
    - ``taps``: the modules of the model's ``feature_taps`` (a mapping with
      ``stages`` and ``pooled``, the default taps of feature losses) are
      modules of the model, and hooking them gives tensors with the batch as
      their first dim; without ``feature_taps``, hooking the direct children
      gives at least one tensor;
    - ``gradients``: in train mode a loss on the logits gives finite
      gradients, not all zero;
    - ``deterministic``: two models built after the same ``torch.manual_seed``
      give the same logits.
    """
    skip = skipped("backbone", factory, skip)
    params = dict(params or getattr(factory, "testing_params", None) or {})
    if input_shape is None:
        input_shape = getattr(factory, "testing_input_shape", None)
    if input_shape is None:
        input_shape = (8,) if _takes(factory, "in_features") else (3, 32, 32)
    if _takes(factory, "in_features") and "in_features" not in params and len(input_shape) == 1:
        params["in_features"] = input_shape[0]
    meta = device == "meta"

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        with torch.device(device):
            return factory(num_classes=num_classes, **params)

    model = build(0)
    assert isinstance(model, nn.Module), f"a backbone factory returns a torch.nn.Module, got {type(model).__name__}"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *input_shape, generator=g).to(device)
    declared = getattr(model, "feature_taps", None) is not None
    paths = [] if "taps" in skip else default_taps(model)
    if paths:
        check_taps(model, paths, type(model).__name__, "backbone")
    model.eval()
    tapping = Tapping(model, paths)
    with torch.no_grad(), tapping as features:
        logits = Outputs.of(model(x)).logits
    if "num_classes" not in skip:
        assert tuple(logits.shape) == (batch, num_classes), \
            f"logits of shape {tuple(logits.shape)} for {batch} inputs and num_classes={num_classes}"
    if "taps" not in skip and declared:
        for path in paths:
            f = features.get(path)
            assert isinstance(f, torch.Tensor), f"tap {path!r} gave no tensor (got {type(f).__name__})"
            assert f.shape[0] == batch, f"tap {path!r}: first dim {f.shape[0]}, batch {batch}"
    elif "taps" not in skip:
        assert any(isinstance(f, torch.Tensor) for f in features.values()), \
            f"hooking the model's children {paths} gave no tensor"
    if meta:
        return model
    if "batch_rows" not in skip:
        with torch.no_grad():
            alone = Outputs.of(model(x[:1])).logits
        close(alone[0], logits[0], "eval-mode logits of a row alone vs in a batch", rtol=1e-4, atol=1e-5)
    if "gradients" not in skip:
        model.train()
        out = Outputs.of(model(x)).logits
        out.float().logsumexp(-1).mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads, "no parameter gets a gradient"
        assert all(torch.isfinite(q).all() for q in grads), "non-finite parameter gradients"
        assert any(q.abs().sum() > 0 for q in grads), "every parameter gradient is zero"
    if "deterministic" not in skip:
        a, b = build(3).eval(), build(3).eval()
        with torch.no_grad():
            close(Outputs.of(a(x)).logits, Outputs.of(b(x)).logits, "two models built from the same seed")
    return model
