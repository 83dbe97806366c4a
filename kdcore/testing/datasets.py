"""Checks for datasets: ``factory(**params) -> kdcore.data.DataSplits``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from kdcore.data import DataSplits, TensorSplit
from kdcore.losses.functional import IGNORE_INDEX
from kdcore.testing.inputs import close
from kdcore.testing.skips import skipped


def _items(split: Any, count: int = 3) -> list[tuple[int, Any]]:
    """The first, middle and last items of a split (fewer for a short one)."""
    n = len(split)
    return [(i, split[i]) for i in sorted({0, n // 2, n - 1})][:count]


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def check_dataset(factory: Callable[..., DataSplits], params: Mapping[str, Any] | None = None,
                  skip: Iterable[str] = ()) -> DataSplits:
    """Assert that ``factory(**params)`` (``params`` default to the factory's
    ``testing_params`` attribute, else none) returns data the engine can train
    on, and return it. Sub-checks:

    - ``splits``: a :class:`kdcore.data.DataSplits` with a ``train`` split,
      ``num_classes`` a positive int, ``input_shape`` a tuple of ints;
    - ``lengths``: every split present has ``len() > 0``;
    - ``item_schema``: an item is ``(input, target)``, or a mapping holding
      ``"target"`` and the model's named inputs (tensors);
    - ``targets``: targets are integer classes in ``[0, num_classes)`` or -100;
    - ``input_shape``: a tensor input's shape is ``input_shape``;
    - ``deterministic``: a second call with the same parameters gives equal
      items (first, middle and last of every split, each read after the same
      ``torch.manual_seed``, so random augmentation may draw from the global
      generator);
    - ``posterior``: a :class:`~kdcore.data.TensorSplit` ``posterior`` is
      ``[n, num_classes]`` (``[n, T, num_classes]`` token level) with rows
      summing to 1.
    """
    skip = skipped("dataset", factory, skip)
    params = dict(params if params is not None else getattr(factory, "testing_params", None) or {})
    data = factory(**params)
    splits = {name: getattr(data, name) for name in ("train", "val", "test")
              if getattr(data, name, None) is not None}
    if "splits" not in skip:
        assert isinstance(data, DataSplits), f"a dataset factory returns kdcore.data.DataSplits, got {type(data)}"
        assert "train" in splits, "DataSplits.train is None"
        assert isinstance(data.num_classes, int) and not isinstance(data.num_classes, bool) \
            and data.num_classes > 0, f"num_classes {data.num_classes!r}"
        assert isinstance(data.input_shape, tuple) and all(isinstance(d, int) for d in data.input_shape), \
            f"input_shape {data.input_shape!r} (a tuple of ints)"
    if "lengths" not in skip:
        for name, split in splits.items():
            assert len(split) > 0, f"split {name} is empty"
    for name, split in splits.items():
        for i, item in _items(split):
            where = f"{name}[{i}]"
            if isinstance(item, Mapping):
                inputs, target = {k: v for k, v in item.items() if k != "target"}, item.get("target")
            else:
                inputs, target = (item if isinstance(item, (tuple, list)) and len(item) == 2 else (None, None))
            if "item_schema" not in skip:
                assert target is not None, f"{where}: an item is (input, target) or a mapping with 'target'"
                tensors = inputs.values() if isinstance(inputs, Mapping) else [inputs]
                assert all(isinstance(t, torch.Tensor) for t in tensors), f"{where}: inputs are tensors"
            if "targets" not in skip:
                y = torch.as_tensor(target)
                assert not y.is_floating_point(), f"{where}: targets are integer classes, got {y.dtype}"
                ok = ((y >= 0) & (y < data.num_classes)) | (y == IGNORE_INDEX)
                assert bool(ok.all()), f"{where}: a target outside [0, {data.num_classes}) and not -100: {y}"
            if "input_shape" not in skip and isinstance(inputs, torch.Tensor):
                assert tuple(inputs.shape) == tuple(data.input_shape), \
                    f"{where}: input of shape {tuple(inputs.shape)}, input_shape {data.input_shape}"
    if "posterior" not in skip:
        for name, split in splits.items():
            if isinstance(split, TensorSplit) and split.posterior is not None:
                post = split.posterior
                assert post.shape[0] == len(split) and post.shape[-1] == data.num_classes, \
                    f"{name}.posterior of shape {tuple(post.shape)}: [n, ..., num_classes]"
                close(post.sum(-1), torch.ones(post.shape[:-1], dtype=post.dtype), f"{name}.posterior rows sum to 1")
    if "deterministic" not in skip:
        again = factory(**params)
        for name, split in splits.items():
            other = getattr(again, name)
            assert len(other) == len(split), f"{name}: {len(other)} items on a second call, {len(split)} first"
            for i in sorted({0, len(split) // 2, len(split) - 1}):
                torch.manual_seed(i)  # random augmentation draws from the global generator
                item = split[i]
                torch.manual_seed(i)
                assert _equal(item, other[i]), f"{name}[{i}] differs between two calls with the same parameters"
    return data
