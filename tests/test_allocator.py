"""``run.malloc``: glibc keeps freed memory for the next step instead of handing it back."""

from __future__ import annotations

import ctypes
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from kdcore.common.errors import ConfigError
from kdcore.engine import allocator, build_trainer
import kdcore.engine.trainer

_spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).with_name("helpers_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")

# 50 blocks of 4 MiB from malloc, written, then freed, in a process without torch (whose
# import can move glibc's dynamic threshold): under glibc's defaults they are mapped one by
# one and unmapped when freed (the resident size falls back); kept, the process holds them.
PROBE = """
import ctypes, importlib.util, os, sys
spec = importlib.util.spec_from_file_location("allocator", sys.argv[2])
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
tuned = allocator.keep_freed_memory() if sys.argv[1] == "1" else False
base = rss()
blocks = [libc.malloc(4 << 20) for _ in range(50)]
for b in blocks:
    ctypes.memset(b, 1, 4 << 20)
peak = rss()
for b in blocks:
    libc.free(b)
print(tuned, peak - base, rss() - base)
"""


def _probe(tune: bool) -> tuple[str, float, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if tune else "0", allocator.__file__],
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], float(out[1]), float(out[2])


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_freed_blocks_stay_with_the_process_only_when_told():
    tuned, grown, kept = _probe(True)
    assert tuned == "True" and grown > 150 and kept > 0.9 * grown
    tuned, grown, kept = _probe(False)
    assert tuned == "False" and grown > 150 and kept < 0.2 * grown


@pytest.mark.skipif(GLIBC, reason="for C libraries other than glibc")
def test_other_c_libraries_are_left_alone():
    assert allocator.keep_freed_memory() is False


@pytest.mark.parametrize("malloc, calls", [("reuse", 1), ("system", 0)])
def test_the_trainer_tunes_the_allocator_unless_told_not_to(monkeypatch, malloc, calls):
    seen = []
    monkeypatch.setattr(kdcore.engine.runtime.allocator, "keep_freed_memory", lambda: seen.append(1) or True)
    conf = runs.teacher_config()
    conf["run"]["malloc"] = malloc
    build_trainer(conf, None, quiet=True)
    assert len(seen) == calls


def test_an_unknown_malloc_mode_is_a_config_error():
    conf = runs.teacher_config()
    conf["run"]["malloc"] = "jemalloc"
    with pytest.raises(ConfigError, match="run.malloc"):
        build_trainer(conf, None, quiet=True)
