"""Test-session settings for the core and every plugin's tests.

The suites run many tiny tensor operations, for which intra-op threads only
add hand-off cost (and, on a loaded machine, oversubscription): one thread,
also in the subprocesses the CLI and DDP tests start.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
