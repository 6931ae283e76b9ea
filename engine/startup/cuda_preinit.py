"""Create the CUDA driver's primary context on a thread while torch is still importing (no torch here).

torch creates its CUDA context lazily, on the first CUDA call, which holds the interpreter for the ~1-2 s
that driver initialization and context creation take on a big GPU — after the seconds spent importing
torch. `start(device)` makes those calls itself through the driver library (ctypes releases the GIL
during them), on a daemon thread begun before torch is imported, so both happen at once; torch later
finds the driver initialized and the device's primary context alive (the CUDA runtime uses that context)
and goes on at once. Best effort: without libcuda, or on any error, nothing happens and torch does it as
before. Only for runs that will use CUDA (engine.startup.readahead.gpu_likely).
"""

from __future__ import annotations

import threading

from engine.core import timeline
from engine.core.settings import settings
from engine.startup import readahead


def _device_index(device: str | None) -> int:
    d = str(device or "auto").lower()
    if d.startswith("cuda:"):
        try:
            return int(d.split(":", 1)[1])
        except ValueError:
            return 0
    return 0


def _init(index: int) -> None:
    try:
        import ctypes

        cuda = ctypes.CDLL("libcuda.so.1")
        if cuda.cuInit(0) != 0:
            return
        dev = ctypes.c_int()
        if cuda.cuDeviceGet(ctypes.byref(dev), index) != 0:
            return
        ctx = ctypes.c_void_p()
        if cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0:
            timeline.mark("cuda_preinit")
    except (OSError, AttributeError):
        pass


def start(device: str | None) -> threading.Thread | None:
    """On a CUDA run, initialize the driver and the device's primary context on a daemon thread."""
    if settings().no_cuda_preinit or not readahead.gpu_likely(device):
        return None
    t = threading.Thread(target=_init, args=(_device_index(device),), name="cuda-preinit", daemon=True)
    t.start()
    return t
