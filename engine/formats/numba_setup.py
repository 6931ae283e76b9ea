"""Import numba with its on-disk cache in a writable place: `<user cache dir>/quantdeck/numba`.

numba reads NUMBA_CACHE_DIR when it is first imported, so every kernel module imports numba through here.
An explicit NUMBA_CACHE_DIR wins. Installs in read-only site-packages still cache this way.
"""

from __future__ import annotations

import os

if "NUMBA_CACHE_DIR" not in os.environ:  # must be set before numba reads its config
    import platformdirs

    os.environ["NUMBA_CACHE_DIR"] = os.path.join(platformdirs.user_cache_dir("quantdeck"), "numba")

import numba  # noqa: E402
from numba import njit, prange  # noqa: E402

if not getattr(numba.config, "CACHE_DIR", ""):  # numba was imported before us: point it at the same place
    numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]

import threading  # noqa: E402

# Parallel kernels already use every core, and numba's fallback "workqueue" threading layer crashes on
# concurrent launches: callers hold this lock around each kernel call (a converter's reader/writer threads
# may call in at the same time). With libgomp ("omp"), do not fork a process that has run kernels;
# use the spawn start method for worker processes.
KERNEL_LOCK = threading.Lock()

__all__ = ["KERNEL_LOCK", "njit", "prange"]
