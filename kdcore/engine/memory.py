"""Peak memory of a training step (``run.measure_memory``).

The figure is the peak, during the run's second optimizer step, of the tensor
memory allocated beyond what was live when the step began: activations,
logits, gradients and every temporary of the losses; not the models, the
optimizer state or the data, which exist before it. The second step, because
the first also allocates what lasts (optimizer state, lazily built
connectors). On CUDA it comes from the caching allocator's statistics
(``torch.cuda.max_memory_allocated``); on the CPU, which keeps no such
statistics, from the PyTorch profiler's record of every allocation and free
during that one step (``profile_memory=True``), summed in time order.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch

#: the optimizer step that is measured (1-based)
MEASURED_STEP = 2
_UNMEASURED = contextlib.nullcontext()


class StepMemory:
    """Measures one step's peak; :attr:`peak_mib` stays None until it has run
    (a run of one step, or one resumed after it, has no figure)."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self.peak_mib: float | None = None

    def around(self, step: int) -> contextlib.AbstractContextManager:
        """Wrap optimizer step number ``step`` (1-based); measures it when it is the
        measured one (every other step gets a shared no-op context: no cost per step)."""
        if not self.enabled or step != MEASURED_STEP:
            return _UNMEASURED
        return self._measure()

    @contextlib.contextmanager
    def _measure(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            extra = torch.cuda.max_memory_allocated(self.device) - before
        else:
            from torch.profiler import ProfilerActivity, profile

            # the profiler's C++ side logs its start and stop, and frees of tensors older than
            # the step, to file descriptor 2: silenced for the step (Python's messages still show)
            with _native_stderr_silenced():
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    yield
                extra = _peak_bytes(prof)
        self.peak_mib = round(extra / 2**20, 3)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to the null device while the block runs; ``sys.stderr``
    meanwhile writes to the original stream (through a copy of the descriptor)."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    python_stderr = sys.stderr
    try:
        os.dup2(null, 2)
        with open(saved, "w", closefd=False) as original:
            sys.stderr = original
            try:
                yield
            finally:
                sys.stderr = python_stderr
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _peak_bytes(prof) -> int:
    """The highest running sum of the CPU allocations (+) and frees (-) the profiler recorded."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
