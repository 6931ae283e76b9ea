"""Import numba with its on-disk cache in a writable place: `<user cache dir>/quantdeck/numba`.

numba reads NUMBA_CACHE_DIR when it is first imported, so every kernel module imports numba through here.
An explicit NUMBA_CACHE_DIR wins. Installs in read-only site-packages still cache this way.
"""

from __future__ import annotations

import os

if "NUMBA_CACHE_DIR" not in os.environ:  # must be set before numba reads its config
    from engine.core.fsutil import user_cache_dir

    os.environ["NUMBA_CACHE_DIR"] = str(user_cache_dir("numba"))

try:
    import numba
    from numba import njit, prange
except ImportError as e:  # the C kernels are the default; numba is the optional fallback (quantdeck[numba])
    from engine.core.errors import KernelsUnavailableError
    from engine.formats.native import build

    why = build.unavailable() or "QUANTDECK_KERNELS=numba asks for them"
    raise KernelsUnavailableError(
        f"the C kernels cannot be used ({why}) and numba, the fallback, is not installed",
        at="engine.formats.native",
        hint="install a C compiler (Debian: apt-get install gcc libc6-dev) so the C kernels build, or the "
             "fallback with pip install 'quantdeck[numba]'") from e

if not getattr(numba.config, "CACHE_DIR", ""):  # numba was imported before us: point it at the same place
    numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]

import threading  # noqa: E402
from contextlib import contextmanager  # noqa: E402

# Parallel kernels already use every core, and numba's fallback "workqueue" threading layer crashes on
# concurrent launches: callers hold this lock around each kernel call (a converter's reader/writer threads
# may call in at the same time). With libgomp ("omp"), do not fork a process that has run kernels;
# use the spawn start method for worker processes.
KERNEL_LOCK = threading.Lock()

from engine.core.settings import settings  # noqa: E402

# Rows per chunk of a parallel loop: chunks are handed to the kernel's threads as they finish, instead of one
# fixed share per thread, so a thread that the converter's own reader and writer threads hold up does not
# hold up the whole call. QUANTDECK_KERNEL_CHUNK=0: numba's static shares.
CHUNK_ROWS = settings().kernel_chunk

# Which way a thread runs kernels, and how many threads a parallel call asks for (QUANTDECK_KERNEL_THREADS, 0: every
# core), are engine.formats.kernel_mode's (shared with the C kernels). Leaving cores to the reader and writer
# threads measured within the run-to-run noise on a 16-core box (12 vs 16 threads: 7.8 vs 9.2 s on one machine,
# 8.1 vs 7.1 s on another).
from engine.formats.kernel_mode import serial, serial_kernels, threads_asked  # noqa: E402


def run_kernel(parallel, serial_fn, *args, chunk: int | None = None) -> None:
    """Call `serial_fn(*args)` inside `serial_kernels()`, else `parallel(*args)` under `kernel_call(chunk)`."""
    if serial():
        serial_fn(*args)
        return
    with kernel_call(chunk):
        parallel(*args)


@contextmanager
def kernel_call(chunk: int | None = None):
    """Hold around each parallel kernel call: one call at a time, chunked scheduling (CHUNK_ROWS iterations
    of the parallel loop per chunk; `chunk` for a loop whose iterations are bigger than a row, e.g. 1 for a
    loop over 128-row tiles)."""
    with KERNEL_LOCK:
        threads = threads_asked()
        if threads:
            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        prev = numba.set_parallel_chunksize(CHUNK_ROWS if chunk is None or not CHUNK_ROWS else chunk)
        try:
            yield
        finally:
            numba.set_parallel_chunksize(prev)


__all__ = ["CHUNK_ROWS", "KERNEL_LOCK", "kernel_call", "njit", "prange", "run_kernel", "serial_kernels"]
