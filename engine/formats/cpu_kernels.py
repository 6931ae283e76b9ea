"""The CPU kernels, in C where the machine can build them (engine.formats.native), else in numba
(engine.formats.nvfp4.kernels_cpu, engine.formats.fp8_block.kernels_cpu). Same bytes either way: both are the
same float32 operations as the torch reference, and the tests hold both to it.

Callers (engine.formats.nvfp4.host, engine.formats.fp8_block.host) check shapes and dtypes and pass C-contiguous
numpy arrays. Each call runs on the calling thread inside engine.formats.kernel_mode.serial_kernels(), else over
every core. numba is imported only where the C kernels are not used.
"""

from __future__ import annotations

from engine.formats.native import build, calls


def backend() -> str:
    """"c" or "numba": what the calls below run (building the C kernels on the first ask)."""
    return "c" if build.library() is not None else "numba"


def fp8_tile_max(wb, bo: int, bi: int, out) -> None:
    """out[tr, t] = the largest magnitude byte (b & 0x7F) of FP8 bytes wb over tile (tr, t)."""
    lib = build.library()
    if lib is not None:
        return calls.fp8_tile_max(lib, wb, bo, bi, out)
    from engine.formats.numba_setup import run_kernel
    from engine.formats.nvfp4 import kernels_cpu as k

    run_kernel(k.fp8_tile_max_kernel, k.fp8_tile_max_serial, wb, bo, bi, out, chunk=1)  # a loop over tile rows


def fp8_block_to_nvfp4(wb, sc, bo: int, bi: int, s2, lut, packed, bs, bad) -> None:
    """FP8-block bytes dequantized and quantized to NVFP4 in one pass (bad[r] = 1 where row r has a NaN code)."""
    lib = build.library()
    if lib is not None:
        return calls.fp8_block_to_nvfp4(lib, wb, sc, bo, bi, s2, lut, packed, bs, bad)
    from engine.formats.numba_setup import run_kernel
    from engine.formats.nvfp4 import kernels_cpu as k

    run_kernel(k.fp8_block_to_nvfp4_kernel, k.fp8_block_to_nvfp4_serial, wb, sc, bo, bi, s2, lut, packed, bs, bad)


def fp32_to_nvfp4(w, s2, lut, packed, bs) -> None:
    """A finite float32 weight quantized to NVFP4."""
    lib = build.library()
    if lib is not None:
        return calls.fp32_to_nvfp4(lib, w, s2, lut, packed, bs)
    from engine.formats.numba_setup import run_kernel
    from engine.formats.nvfp4 import kernels_cpu as k

    run_kernel(k.fp32_to_nvfp4_kernel, k.fp32_to_nvfp4_serial, w, s2, lut, packed, bs)


def fp8_dequant_bf16(wb, sc, bo: int, bi: int, lut, out) -> None:
    """BF16 bits of the dequantized FP8-block weight (no NaN codes: the caller checks)."""
    lib = build.library()
    if lib is not None:
        return calls.fp8_dequant_bf16(lib, wb, sc, bo, bi, lut, out)
    from engine.formats.fp8_block import kernels_cpu as k
    from engine.formats.numba_setup import run_kernel

    run_kernel(k.dequant_bf16_kernel, k.dequant_bf16_serial, wb, sc, bo, bi, lut, out)
