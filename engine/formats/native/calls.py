"""Calls into the C kernels (engine.formats.native.build) on numpy arrays: one weight on the calling thread
(`serial_kernels()`), or its rows split over a pool of threads (ctypes releases the GIL for each call).

Arguments of the conversion kernels are checked by their callers (engine.formats.nvfp4.host,
engine.formats.fp8_block.host): C-contiguous arrays of the right dtypes and shapes. A kernel that could not get
scratch memory raises MemoryError. The helpers validate calls on its own threads (pread_rows, fp8_rows_f32,
nvfp4_rows_f32, e4m3_scan, bf16_finite) check their arguments here and raise ValueError for arrays C cannot take.
"""

from __future__ import annotations

import ctypes
import operator
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
    "qd_fp8_rows_f32": (P, I64, I64, P, P, I64, I64, I64, P, P),
    "qd_nvfp4_rows_f32": (P, P, I64, P, I64, F32, P, P, P),
    "qd_e4m3_scan": (P, I64, P),
    "qd_bf16_nonfinite": (P, I64),
}
RESTYPES = {"qd_pread_rows": I64, "qd_bf16_nonfinite": I64}  # every other function returns an int
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


def _c(a: np.ndarray, dtype, ndim: int) -> bool:
    return a.dtype == dtype and a.ndim == ndim and a.flags.c_contiguous and a.flags.aligned


def _size(n) -> int:
    """A block size C can take as int64 (ctypes would wrap a larger one silently); 0 for anything else."""
    try:
        n = operator.index(n)
    except TypeError:
        return 0
    return n if 0 < n < 2**62 else 0


def fp8_rows_takes(codes: np.ndarray, rows: np.ndarray, sc: np.ndarray, bo, bi, lut: np.ndarray,
                   out: np.ndarray) -> bool:
    """Whether `fp8_rows_f32` takes these arrays (what C indexes, in bounds); validate's numpy path takes any others."""
    k, cols = codes.shape if codes.ndim == 2 else (-1, -1)
    bo, bi = _size(bo), _size(bi)
    return bool(_c(codes, np.uint8, 2) and _c(rows, np.int64, 1) and len(rows) == k and _c(sc, np.float32, 2)
                and bo and bi and sc.shape[1] == -(-cols // bi) and _c(lut, np.float32, 1) and lut.size == 256
                and _c(out, np.float32, 2) and out.shape == (k, cols) and out.flags.writeable
                and (k == 0 or (0 <= int(rows.min()) and int(rows.max()) // bo < sc.shape[0])))


def fp8_rows_f32(lib, codes: np.ndarray, rows: np.ndarray, sc: np.ndarray, bo: int, bi: int, lut: np.ndarray,
                 out: np.ndarray) -> np.ndarray:
    """float32 values of FP8 rows on the calling thread: codes uint8 [k, cols] (the weight's rows `rows`, int64
    [k]), sc float32 tile scales [., ceil(cols / bi)] covering every rows[j] // bo, lut float32 [256]; into `out`
    [k, cols]."""
    if not fp8_rows_takes(codes, rows, sc, bo, bi, lut, out):
        raise ValueError("fp8_rows_f32: contiguous uint8 codes [k, cols], int64 rows [k] within the scales' tiles, "
                         "float32 scales [tiles, ceil(cols / bi)], float32 lut [256] and out [k, cols]")
    k, cols = codes.shape
    lib.qd_fp8_rows_f32(_p(codes), k, cols, _p(rows), _p(sc), sc.shape[1], bo, bi, _p(lut), _p(out))
    return out


def nvfp4_rows_takes(packed: np.ndarray, bs: np.ndarray, rows: np.ndarray | None, lut: np.ndarray,
                     pair: np.ndarray, out: np.ndarray) -> bool:
    """Whether `nvfp4_rows_f32` takes these arrays (what C indexes, in bounds); validate's numpy path takes any
    others."""
    o, p = packed.shape if packed.ndim == 2 else (-1, -1)
    k = o if rows is None else len(rows)
    return bool(_c(packed, np.uint8, 2) and p % 8 == 0 and _c(bs, np.uint8, 2) and bs.shape == (o, p // 8)
                and (rows is None or (_c(rows, np.int64, 1) and (k == 0 or (0 <= int(rows.min())
                                                                           and int(rows.max()) < o))))
                and _c(lut, np.float32, 1) and lut.size == 256 and _c(pair, np.float32, 2) and pair.shape == (256, 2)
                and _c(out, np.float32, 2) and out.shape == (k, 2 * p) and out.flags.writeable)


def nvfp4_rows_f32(lib, packed: np.ndarray, bs: np.ndarray, s2: float, rows: np.ndarray | None, lut: np.ndarray,
                   pair: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float32 values of NVFP4 rows on the calling thread: packed uint8 [o, p] (p a multiple of 8), bs uint8
    [o, p / 8], rows int64 [k] (None: all o), lut float32 [256], pair float32 [256, 2]; into `out` [k, 2p]."""
    if not nvfp4_rows_takes(packed, bs, rows, lut, pair, out):
        raise ValueError("nvfp4_rows_f32: contiguous uint8 packed [o, 8m] and scales [o, m], int64 rows within o, "
                         "float32 lut [256], pair [256, 2] and out [k, 16m]")
    lib.qd_nvfp4_rows_f32(_p(packed), _p(bs), packed.shape[1], None if rows is None else _p(rows), out.shape[0],
                          float(s2), _p(lut), _p(pair), _p(out))
    return out


def e4m3_scan_takes(bs: np.ndarray) -> bool:
    """Whether `e4m3_scan` takes `bs`; validate's numpy path takes any other."""
    return bool(bs.dtype == np.uint8 and bs.flags.c_contiguous)


def e4m3_scan(lib, bs: np.ndarray) -> tuple[int, int, int]:
    """(NaN bytes, bytes that are not a finite scale > 0, largest magnitude byte) of E4M3 block scales `bs`."""
    if not e4m3_scan_takes(bs):
        raise ValueError("e4m3_scan: contiguous uint8 scales")
    out = np.zeros(3, np.int64)
    lib.qd_e4m3_scan(_p(bs), bs.size, _p(out))
    return int(out[0]), int(out[1]), int(out[2])


def bf16_finite_takes(x: np.ndarray) -> bool:
    """Whether `bf16_finite` takes `x`; validate's numpy path takes any other."""
    return bool(x.dtype == np.uint16 and x.flags.c_contiguous and x.flags.aligned)


def bf16_finite(lib, x: np.ndarray) -> bool:
    """No NaN or Inf among BF16 values given as their uint16 bits `x` (one pass, stopping at the first)."""
    if not bf16_finite_takes(x):
        raise ValueError("bf16_finite: contiguous, aligned uint16 values")
    return int(lib.qd_bf16_nonfinite(_p(x), x.size)) == x.size
