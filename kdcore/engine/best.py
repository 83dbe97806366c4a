"""Which evaluation makes ``checkpoints/best.pt``: ``run.best_metric``.

The metric is a key of the validation record (:func:`kdcore.engine.evaluate.evaluate`
with the prefix ``val``): ``val_acc`` is better higher,
``val_nll``, ``val_ppl``, ``val_kl``, ``val_tv`` and ``val_l2`` lower. ``"auto"``
(the default) is ``val_nll`` for token-level data (language models, where top-1
accuracy says little) and ``val_acc`` otherwise. A metric the validation split
cannot give (a distance to the truth on data whose true distribution is unknown)
is a config error before anything trains.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from kdcore.common.errors import ConfigError

#: the metrics ``run.best_metric`` may name, and whether higher is better
DIRECTIONS = {"val_acc": True, "val_nll": False, "val_ppl": False,
              "val_kl": False, "val_tv": False, "val_l2": False}
_NEEDS_TRUTH = ("val_kl", "val_tv", "val_l2")


def resolve(name: str, *, token_level: bool, has_truth: bool) -> str:
    """The metric ``run.best_metric = name`` means for this run (``"auto"`` resolved),
    or a :class:`ConfigError` naming ``run.best_metric``."""
    if name == "auto":
        return "val_nll" if token_level else "val_acc"
    if name not in DIRECTIONS:
        raise ConfigError(f"run.best_metric: unknown metric {name!r}; choose one of "
                          f"{', '.join(['auto', *DIRECTIONS])}")
    if name in _NEEDS_TRUTH and not has_truth:
        raise ConfigError(f"run.best_metric: {name} is a distance to the true distribution, which this "
                          "dataset does not know; use val_nll or val_acc")
    if name == "val_ppl" and not token_level:
        raise ConfigError("run.best_metric: val_ppl is reported for token-level data only; use val_nll")
    return name


class BestMetric:
    """The best value of one metric so far, and the epoch that reached it."""

    def __init__(self, name: str):
        self.name, self.higher = name, DIRECTIONS[name]
        self.value: float | None = None
        self.epoch: int | None = None

    def improves(self, record: Mapping[str, Any], epoch: int) -> bool:
        """Whether ``record`` beats the best so far (a NaN never does); if so it becomes the best."""
        value = record.get(self.name)
        if value is None or math.isnan(value):
            return False
        if self.value is not None and not (value > self.value if self.higher else value < self.value):
            return False
        self.value, self.epoch = float(value), epoch
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"best_metric": self.name, "best_value": self.value, "best_epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from a checkpoint's state; a checkpoint of another metric (or of kdcore
        before ``run.best_metric``, which kept ``best_val_acc``) restores only what it measured."""
        if state.get("best_metric", "val_acc") != self.name:
            self.value, self.epoch = None, None
            return
        self.value = state.get("best_value", state.get("best_val_acc"))
        self.epoch = state.get("best_epoch")
