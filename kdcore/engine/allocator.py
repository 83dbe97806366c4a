"""The C library's allocator, told to keep freed memory for the next step (``run.malloc``).

PyTorch's CPU tensors come from ``malloc``. glibc's defaults hand large freed
blocks back to the operating system: blocks above a threshold are ``mmap``-ed
and ``munmap``-ed one by one, and the top of the heap is trimmed once more than
twice that threshold lies free there. A training step allocates and frees the
same activations every step, so each step faults the same memory in again, a
page (4 KiB) at a time, in system time: 2% to 14% of a resnet32x4 -> resnet8x4
training step on one CPU thread, varying with the order of the step's
allocations and frees, and more than the whole of the engine's own work.

With the mapping threshold at glibc's 64-bit maximum (32 MiB) and heap trimming
only past 2 GiB free, blocks up to 32 MiB are reused from the heap; larger ones
are still mapped per allocation. The process keeps its peak heap until it ends
(what a training process does anyway).

Only glibc (Linux) is tuned; elsewhere :func:`keep_freed_memory` does nothing.
The settings are the process's and stay for its lifetime.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest value glibc accepts on 64-bit systems
TRIM_THRESHOLD = 2 ** 31 - 1  # a C int: trim only past 2 GiB free at the top of the heap


def keep_freed_memory() -> bool:
    """Set glibc's ``M_MMAP_THRESHOLD`` to 32 MiB and ``M_TRIM_THRESHOLD`` to 2 GiB;
    True where that was done (Linux with glibc), False where the C library is another."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
