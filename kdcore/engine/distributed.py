"""Process-group helpers: torchrun launches, rank-0-only writes, metric all-reduce.

A process joins the group torchrun describes after :func:`torchrun_env` has
checked the environment (a bad ``RANK`` would otherwise wait out c10d's
retries), waiting at most ``run.dist_timeout_s`` for its peers and leaving
SIGTERM able to end the wait. A process that joined a group ends with
:func:`leave` (the ``kdcore`` console script calls it): torch can keep a
process group's worker threads alive after :func:`teardown` (FSDP2 keeps
the group), and a worker that frees a finished collective's tensors while
the interpreter finalizes is stopped by CPython inside C++ code that may not
unwind, which aborts the process (``terminate called without an active
exception``) after its work is done.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
import threading
from collections.abc import Mapping
from typing import NoReturn

import attrs
import torch
import torch.distributed as dist

from kdcore.common.errors import ConfigError, RunFailure

#: seconds a process waits for the other processes of its job (``run.dist_timeout_s``)
DEFAULT_TIMEOUT_S = 300.0

_LAUNCH = "launch with torchrun, which sets it, or unset WORLD_SIZE to run one process"

#: set once this process starts joining a process group (see :func:`leave`)
_joined = False


class RendezvousFailure(RunFailure):
    """The processes of a job did not all join its process group in time (exit 1)."""


@attrs.frozen
class Dist:
    """The process's place in a (possibly single-process) job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place; identity in a single process."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (a new tensor); identity in a single process."""
        if not self.enabled:
            return t
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.div_(self.world)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _env_int(env: Mapping[str, str], name: str, low: int, high: int | None = None, why: str = "") -> int:
    """The integer environment variable ``name``, in ``[low, high)``; a one-line ConfigError otherwise."""
    text = env[name]
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} in the environment is not an integer ({_LAUNCH})") from None
    if value < low or high is not None and value >= high:
        bound = f"from {low} to {high - 1}{why}" if high is not None else f"at least {low}"
        raise ConfigError(f"{name}: {value} in the environment is out of range, must be {bound} ({_LAUNCH})")
    return value


def torchrun_env(env: Mapping[str, str] = os.environ) -> Dist:
    """The job torchrun describes in ``env`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``), checked before any rendezvous: a missing or
    malformed variable, or a rank outside the job, is a ConfigError naming it.
    Without ``WORLD_SIZE`` (or with 1) the process runs alone."""
    if "WORLD_SIZE" not in env:
        return Dist()
    world = _env_int(env, "WORLD_SIZE", 1)
    if world == 1:
        return Dist()
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name, "").strip():
            raise ConfigError(f"{name}: not set in the environment while WORLD_SIZE={world} ({_LAUNCH})")
    of_world = f" as WORLD_SIZE={world}"
    rank = _env_int(env, "RANK", 0, world, of_world)
    local = _env_int(env, "LOCAL_RANK", 0, world, of_world) if env.get("LOCAL_RANK", "").strip() else 0
    _env_int(env, "MASTER_PORT", 1, 65536)
    return Dist(rank, world, local)


def setup(device_kind: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Dist:
    """Join the process group torchrun describes in the environment, if any, waiting
    at most ``timeout_s`` seconds for the other processes."""
    d = torchrun_env()
    if d.enabled and not dist.is_initialized():
        if device_kind == "cuda":
            torch.cuda.set_device(d.local_rank)
        _rendezvous("nccl" if device_kind == "cuda" else "gloo", d, timeout_s)
    return d


def _rendezvous(backend: str, d: Dist, timeout_s: float) -> None:
    """``init_process_group`` in a helper thread that the main thread waits for: a wait in
    C++ never runs Python's signal handlers, a join does, so SIGTERM (and Ctrl-C) end a
    process whose peers never come. A group that does not form in time is a
    :class:`RendezvousFailure`."""
    global _joined
    # imported before the group exists: imported later (DDP does), its functions' default
    # ``group=group.WORLD`` arguments would keep the group, and its threads, past teardown
    import torch.distributed.nn.functional  # noqa: F401

    _joined = True
    outcome: list[BaseException | None] = []

    def join() -> None:
        try:
            if backend == "nccl":
                torch.cuda.set_device(d.local_rank)  # the device is per thread
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
            outcome.append(None)
        except BaseException as exc:  # handed to the main thread
            outcome.append(exc)

    helper = threading.Thread(target=join, name="kdcore-rendezvous", daemon=True)
    helper.start()
    helper.join()
    if outcome[0] is None:
        return
    exc = outcome[0]
    if isinstance(exc, dist.DistError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RendezvousFailure(
            f"the {d.world} processes of the job did not all join within run.dist_timeout_s = {timeout_s:g} s "
            f"(rank {d.rank}: {first}); start every rank, or raise run.dist_timeout_s") from None
    raise exc


def teardown(d: Dist) -> None:
    """Leave the process group. The caller drops its DDP/FSDP model and optimizer first:
    what still holds the group keeps its worker threads running past this point."""
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def joined() -> bool:
    """Whether this process joined (or began to join) a process group."""
    return _joined


def leave(code: int) -> NoReturn:
    """End a process that joined a process group with exit status ``code``: its
    non-daemon threads joined, its ``atexit`` functions run and its standard
    streams flushed, then ``os._exit``, without the interpreter's finalization,
    during which a process-group worker thread still freeing a finished
    collective's tensors would abort the process."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to write to
            pass
    os._exit(code)


def wrap(model, device: torch.device, d: Dist, sharded: bool):
    """The student as the step runs it: itself in one process, sharded in place
    (FSDP2, ``run.strategy = "fsdp"``) or in a DDP wrapper under ``torchrun``."""
    if not d.enabled:
        return model
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh(device.type, (d.world,)))
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
