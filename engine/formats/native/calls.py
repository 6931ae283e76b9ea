"""Calls into the C kernels (engine.formats.native.build) on numpy arrays: one weight on the calling thread
(`serial_kernels()`), or its rows split over a pool of threads (ctypes releases the GIL for each call).

Arguments are checked by the callers (engine.formats.nvfp4.host, engine.formats.fp8_block.host): C-contiguous
arrays of the right dtypes and shapes. A kernel that could not get scratch memory raises MemoryError.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from engine.formats.kernel_mode import kernel_threads, serial

P, I64, F32, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SIGNATURES = {
    "qd_fp8_block_to_nvfp4": (P, P, I64, I64, I64, I64, F32, P, P, P, P, I64, I64),
    "qd_fp32_to_nvfp4": (P, I64, I64, F32, P, P, P, I64, I64),
    "qd_fp8_tile_max": (P, I64, I64, I64, I64, P, I64, I64),
    "qd_fp8_dequant_bf16": (P, P, I64, I64, I64, I64, P, P, I64, I64),
    "qd_pread_rows": (INT, P, I64, I64, P, INT),
}
RESTYPES = {"qd_pread_rows": I64}  # every other function returns an int
CHUNKS_PER_THREAD = 4  # a weight split over the pool: chunks handed out as threads finish

_pool: list[ThreadPoolExecutor] = []
_pool_lock = threading.Lock()


def typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Give `lib`'s kernels their C signatures (engine.formats.native.build calls this as it loads it)."""
    for n, args in SIGNATURES.items():
        f = getattr(lib, n)
        f.argtypes, f.restype = args, RESTYPES.get(n, ctypes.c_int)
    return lib


def _executor() -> ThreadPoolExecutor:
    with _pool_lock:
        if not _pool:
            _pool.append(ThreadPoolExecutor(kernel_threads(), thread_name_prefix="quantdeck-kernel"))
        return _pool[0]


def _run(fn, head: tuple, rows: int) -> None:
    """fn(*head, r0, r1) over rows [0, rows): on this thread in serial mode, else in chunks over the pool."""
    threads = 1 if serial() else min(kernel_threads(), rows)
    step = -(-rows // (threads * CHUNKS_PER_THREAD)) if threads > 1 else rows
    spans = [(r, min(rows, r + step)) for r in range(0, rows, step)]
    if len(spans) == 1:
        codes = [fn(*head, *spans[0])]
    else:
        futures = [_executor().submit(fn, *head, *span) for span in spans]
        try:
            codes = [f.result() for f in futures]
        except BaseException:  # Ctrl-C here: the other chunks still write into the caller's arrays; let them end
            for f in futures:
                f.cancel()
            wait(futures)
            raise
    if any(codes):
        raise MemoryError(f"{fn.__name__}: no memory for the kernel's scratch rows")


def _p(a: np.ndarray) -> int:
    return a.ctypes.data


def fp8_block_to_nvfp4(lib, wb, sc, bo: int, bi: int, s2, lut, packed, bs, bad) -> None:
    o, i = wb.shape
    _run(lib.qd_fp8_block_to_nvfp4, (_p(wb), _p(sc), o, i, bo, bi, float(s2), _p(lut), _p(packed), _p(bs),
                                              _p(bad)), o)


def fp32_to_nvfp4(lib, w, s2, lut, packed, bs) -> None:
    o, i = w.shape
    _run(lib.qd_fp32_to_nvfp4, (_p(w), o, i, float(s2), _p(lut), _p(packed), _p(bs)), o)


def fp8_tile_max(lib, wb, bo: int, bi: int, out) -> None:
    o, i = wb.shape
    _run(lib.qd_fp8_tile_max, (_p(wb), o, i, bo, bi, _p(out)), out.shape[0])


def fp8_dequant_bf16(lib, wb, sc, bo: int, bi: int, lut, out) -> None:
    o, i = wb.shape
    _run(lib.qd_fp8_dequant_bf16, (_p(wb), _p(sc), o, i, bo, bi, _p(lut), _p(out)), o)


def pread_rows(lib, fd: int, offsets: np.ndarray, out: np.ndarray, advise: bool) -> int:
    """Rows of out.shape[1] bytes at `offsets` (int64) of `fd` into `out` (uint8 [len(offsets), row bytes]) on the
    calling thread, in one call: 0, -errno of a failed read, or k > 0 where the file ended inside row k - 1."""
    if not (offsets.dtype == np.int64 and offsets.ndim == 1 and offsets.flags.c_contiguous and out.dtype == np.uint8
            and out.ndim == 2 and out.flags.c_contiguous and out.flags.writeable and len(offsets) <= out.shape[0]):
        raise ValueError("pread_rows: offsets must be contiguous int64 [n], out writable contiguous uint8 [>= n, row]")
    return int(lib.qd_pread_rows(fd, _p(offsets), len(offsets), out.shape[1], _p(out), int(advise)))
