"""Per-epoch means of the step values, summed on the device (no sync until read)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


class Meter:
    """Sums of per-step values kept on the device (no sync until read)."""

    def __init__(self):
        self.sums: dict[str, Tensor] = {}
        self.info: dict[str, float] = {}
        self.info_counts: dict[str, int] = {}
        self.steps = 0

    def add(self, values: Mapping[str, Tensor]) -> None:
        for k, v in values.items():
            v = v.detach()
            if k in self.sums:
                self.sums[k] += v
            else:
                self.sums[k] = v.clone().float()
        self.steps += 1

    def add_info(self, info: Mapping[str, float]) -> None:
        for k, v in info.items():
            self.info[k] = self.info.get(k, 0.0) + float(v)
            self.info_counts[k] = self.info_counts.get(k, 0) + 1

    def means(self, reduce) -> dict[str, float]:
        out = {}
        for k, v in self.sums.items():
            out[k] = float(reduce(v / max(self.steps, 1)))
        for k, v in self.info.items():
            out[k] = v / self.info_counts[k]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "info": dict(self.info),
                "info_counts": dict(self.info_counts), "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.info, self.info_counts = dict(state["info"]), dict(state["info_counts"])
        self.steps = int(state["steps"])
