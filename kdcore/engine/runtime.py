"""The process a run trains in: its place in the job, its device and its numerics.

:meth:`Runtime.start` joins the process group ``torchrun`` describes (if any),
picks the device, and sets torch's process-wide options from ``[run]``
(threads, the allocator, determinism, the seed), once, before anything is
built. :meth:`Runtime.autocast` and :meth:`Runtime.inputs` are what every
forward pass of the run goes through.
"""

from __future__ import annotations

import contextlib

import attrs
import torch
from torch import Tensor

from kdcore.common.errors import ConfigError
from kdcore.config import RunConfig
from kdcore.engine import allocator, distributed
from kdcore.engine.distributed import Dist


def pick_device(kind: str, local_rank: int = 0) -> torch.device:
    """The device ``run.device`` asks for (``auto``: CUDA where there is one)."""
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("run.device: 'cuda' asked for but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@attrs.frozen
class Runtime:
    """Where and how a run computes: ``dist`` (rank, world), ``device``, ``amp``
    (``off``, ``bf16``, ``fp16``) and ``channels_last`` image inputs."""

    dist: Dist
    device: torch.device
    amp: str = "off"
    channels_last: bool = False

    @classmethod
    def start(cls, run: RunConfig) -> "Runtime":
        """Join the job, pick the device and set torch's options for ``run``; checks first."""
        cuda = run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available())
        dist = distributed.setup("cuda" if cuda else "cpu", run.dist_timeout_s)
        device = pick_device(run.device, dist.local_rank)
        if run.amp == "fp16" and device.type != "cuda":
            raise ConfigError("run.amp: 'fp16' needs a CUDA device (use 'bf16' on the CPU)")
        if run.batch_size < dist.world * run.accumulate:
            raise ConfigError(f"run.batch_size: {run.batch_size} is smaller than {dist.world} process(es) "
                              f"x run.accumulate = {run.accumulate} micro-batches")
        if run.threads:
            torch.set_num_threads(run.threads)
        if run.malloc == "reuse":
            allocator.keep_freed_memory()
        if run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fastest convolution algorithms for fixed shapes
        torch.manual_seed(run.seed)
        return cls(dist, device, run.amp, run.channels_last)

    def autocast(self):
        """The forward passes' autocast context (a no-op with ``amp = "off"``)."""
        if self.amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

    def inputs(self, inputs):
        """A batch's inputs as the model takes them (channels-last images where asked for)."""
        if self.channels_last and isinstance(inputs, Tensor) and inputs.dim() == 4:
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs
