"""NVFP4 on the CPU from numpy arrays, without torch: the CPU kernels (engine.formats.cpu_kernels: C, else numba)
with their checks.

engine.formats.nvfp4.dispatch's CPU branch calls these for torch tensors; the CPU converter calls them for
the host arrays it reads (engine.checkpoint.host). Inputs: FP8 E4M3 weights as uint8 bytes [o, i], block
scales as float32 [ceil(o/bo), ceil(i/bi)],
float weights as float32 [o, i]. Outputs: packed uint8 [o, ceil(i/16)·8] and E4M3 block-scale bytes
[o, ceil(i/16)], the bytes of engine.formats.nvfp4.helpers' torch reference. Block scales come decoded by
engine.formats.fp8_block.host.block_scales_fp32.
"""

from __future__ import annotations

import numpy as np

from engine.core.errors import FormatError
from engine.formats import cpu_kernels
from engine.formats.fp8_block.host import E4M3_LUT
from engine.formats.grid import E2M1_MAX, E4M3_MAX, check_scale_grid, check_scale_values, packed_cols


def float32_of(data: np.ndarray, dtype: str) -> np.ndarray:
    """A float weight's storage (BF16 bits, F16, F32) as float32 values (exact)."""
    if dtype == "BF16":
        return (data.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("F16", "F32", "F64"):
        return np.ascontiguousarray(data, dtype=np.float32)
    raise FormatError(f"not a float weight: {dtype}", at="float32_of")


def global_scale(amax) -> np.float32:
    """`weight_scale_2` = amax / (6·448) in float32; 1.0 for a zero amax (helpers.global_scale's rule)."""
    a = np.float32(amax)
    if not np.isfinite(a) or a < 0:
        raise FormatError(f"amax must be finite and >= 0, got {float(a)}", at="global_scale", hint="check the weights")
    s = a / np.float32(E2M1_MAX * E4M3_MAX)
    return s if s > 0 else np.float32(1.0)


# global_scale's largest answer (amax = the largest float32): beyond it 6·448·scale_2 overflows
MAX_SCALE_2 = np.float32(np.finfo(np.float32).max) / np.float32(E2M1_MAX * E4M3_MAX)


def _check_scale_2(scale_2) -> np.float32:
    s = np.float32(scale_2)
    if not (np.isfinite(s) and np.float32(0) < s <= MAX_SCALE_2):
        raise FormatError(f"weight_scale_2 must be finite, > 0 and at most {float(MAX_SCALE_2):.4g}, got {float(s)}",
                          at="scale_2", hint="compute it with global_scale(amax)")
    return s


def _check_fp8(wb: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> None:
    if wb.ndim != 2 or wb.size == 0 or wb.dtype != np.uint8:
        raise FormatError(f"expected non-empty 2-D FP8 bytes, got {wb.dtype} {tuple(wb.shape)}",
                          at="fp8_block_to_nvfp4")
    check_scale_grid(wb.shape, scale.shape, block)
    check_scale_values(scale)


def fp8_block_amax(wb: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.float32:
    """max |e4m3(wb) · scale| over the weight, from the largest magnitude byte of each tile (no dequant)."""
    _check_fp8(wb, scale, block)
    tile = np.zeros(scale.shape, np.uint8)
    cpu_kernels.fp8_tile_max(np.ascontiguousarray(wb), int(block[0]), int(block[1]), tile)
    if (tile == 0x7F).any():
        raise FormatError("FP8 weight holds NaN codes", at="fp8_block_amax", hint="the source is corrupt")
    return np.float32((E4M3_LUT[tile] * scale).max())  # float32 × float32, as the dequant does


def fp8_block_to_nvfp4(wb: np.ndarray, scale: np.ndarray, block: tuple[int, int],
                       scale_2) -> tuple[np.ndarray, np.ndarray]:
    """(packed, block-scale bytes) of FP8-block bytes quantized with `scale_2`: dequant + NVFP4 in one pass."""
    _check_fp8(wb, scale, block)
    o, i = wb.shape
    packed = np.empty((o, packed_cols(i)), np.uint8)
    bs = np.empty((o, -(-i // 16)), np.uint8)
    bad = np.zeros(o, np.uint8)
    cpu_kernels.fp8_block_to_nvfp4(np.ascontiguousarray(wb), np.ascontiguousarray(scale, np.float32), int(block[0]),
                                   int(block[1]), _check_scale_2(scale_2), E4M3_LUT, packed, bs, bad)
    if bad.any():
        raise FormatError(f"FP8 weight holds NaN codes (row {int(bad.argmax())})", at="fp8_block_to_nvfp4")
    return packed, bs


def float_to_nvfp4(x: np.ndarray, scale_2) -> tuple[np.ndarray, np.ndarray]:
    """(packed, block-scale bytes) of a finite float32 weight [o, i]."""
    if x.ndim != 2 or x.size == 0:
        raise FormatError(f"expected a non-empty 2-D float weight, got {tuple(x.shape)}", at="bf16_to_nvfp4")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise FormatError("weight holds inf or NaN", at="bf16_to_nvfp4", hint="fix the source weight first")
    o, i = x.shape
    packed = np.empty((o, packed_cols(i)), np.uint8)
    bs = np.empty((o, -(-i // 16)), np.uint8)
    cpu_kernels.fp32_to_nvfp4(x, _check_scale_2(scale_2), E4M3_LUT, packed, bs)
    return packed, bs
