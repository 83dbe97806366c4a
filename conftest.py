"""Test-session settings for the core and every plugin's tests.

The suites run many tiny tensor operations, for which intra-op threads only
add hand-off cost (and, on a loaded machine, oversubscription): one thread,
also in the subprocesses the CLI and DDP tests start. The teachers' evaluations
that runs keep (``KDCORE_CACHE_DIR``) go to a folder of this session, not the
user's cache.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["KDCORE_CACHE_DIR"] = tempfile.mkdtemp(prefix="kdcore-test-cache-")
atexit.register(shutil.rmtree, os.environ["KDCORE_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402

torch.set_num_threads(1)
