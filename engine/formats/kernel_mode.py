"""Which way this thread runs the CPU kernels: over every core, or alone on itself (`serial_kernels()`).

The CPU converter computes one weight per thread, on as many threads as cores (engine.convert.pipeline): a
kernel spread over every core ends each call at a barrier, so one of its threads held up by the converter's own
reader and writer threads holds up the call, and each call is short (a few ms per expert weight). Measured on a
16-core H200 box, one [2048, 7168] FP8 weight after another (numba): parallel kernels 3.7 GB/s alone, 0.8 GB/s
beside 8 reading and 8 writing threads; serial kernels on 16 threads 4.2 GB/s alone, 2.3 GB/s beside them.
Both kernel technologies (engine.formats.native's C, engine.formats.numba_setup's numba) follow this mode.
No numba and no torch here.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

from engine.core.settings import settings

_mode = threading.local()


@contextmanager
def serial_kernels():
    """Within this block, this thread runs each kernel on itself alone."""
    prev = getattr(_mode, "serial", False)
    _mode.serial = True
    try:
        yield
    finally:
        _mode.serial = prev


def serial() -> bool:
    """Is this thread inside `serial_kernels()`?"""
    return getattr(_mode, "serial", False)


def threads_asked() -> int:
    """QUANTDECK_KERNEL_THREADS, 0 where unset (read per call: a `--workers` child sets it after its imports)."""
    return settings().kernel_threads


def kernel_threads() -> int:
    """Threads for one kernel call over every core: QUANTDECK_KERNEL_THREADS, else the cores this process may
    use."""
    env = threads_asked()
    if env > 0:
        return env
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
