"""FP8 block-scaled weights on the CPU from numpy arrays, without torch: scale decoding and the fused
dequantization to BF16 (engine.formats.cpu_kernels: C, else numba; with its checks).

engine.formats.fp8_block.dispatch's CPU branch calls these for torch tensors; the CPU converter for host arrays.
"""

from __future__ import annotations

import numpy as np

from engine.core.errors import FormatError
from engine.formats import cpu_kernels
from engine.formats.grid import check_scale_grid, check_scale_values

E8M0_BIAS = 127


def _e4m3_table() -> np.ndarray:
    """float32 value of each E4M3 (fn) byte: sign, 4-bit exponent (bias 7), 3-bit mantissa, subnormals at
    exponent 0; 0x7F / 0xFF are NaN (no infinities)."""
    c = np.arange(256)
    sign = np.where(c & 0x80, -1.0, 1.0)
    exp, man = (c >> 3) & 0xF, c & 0x7
    mag = np.where(exp == 0, man / 8.0 * 2.0**-6, (1.0 + man / 8.0) * np.exp2(exp - 7.0))
    out = (sign * mag).astype(np.float32)  # every value is exact in float32
    out[[0x7F, 0xFF]] = np.nan
    return out


E4M3_LUT = _e4m3_table()


def block_scales_fp32(data: np.ndarray, dtype: str) -> np.ndarray:
    """Block scales as float32 multipliers (exact), from their storage: E8M0 (or U8) bytes 2^(b-127), BF16
    as uint16 bits, F16, F32. Rejects the E8M0 NaN byte, and inf, NaN or negative values."""
    if dtype in ("F8_E8M0", "U8"):
        if (data == 255).any():
            raise FormatError("E8M0 scale holds the NaN byte 0xFF", at="scale",
                              hint="the source scale tensor is corrupt")
        # 2^(b-127) is exact in float32 for b in [1, 254]; b == 0 is 2^-127, a float32 subnormal, also exact.
        return np.ldexp(np.ones(data.shape, np.float32), data.astype(np.int32) - E8M0_BIAS)
    if dtype == "BF16":
        s = (data.astype(np.uint32) << 16).view(np.float32)
    elif dtype in ("F32", "F16", "F64"):
        s = data.astype(np.float32)
    else:
        raise FormatError(f"unsupported block-scale dtype {dtype}", at="scale",
                          hint="expected float32, bfloat16, float8_e8m0fnu or uint8 (E8M0 bytes)")
    check_scale_values(s)
    return np.ascontiguousarray(s)



def check_codes(wb: np.ndarray) -> None:
    """FP8 E4M3 bytes must hold no NaN code (0x7F / 0xFF): a corrupt source."""
    if ((wb & 0x7F) == 0x7F).any():
        raise FormatError("FP8 weight holds NaN codes", at="dequant_fp8_block", hint="the source is corrupt")


def dequant_bf16(wb: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """BF16 bits (uint16 [o, i]) of fp32(e4m3(wb) × scale) rounded to nearest even, in one pass: the values of
    `dequant_fp8_block(w, s).to(torch.bfloat16)`. Rejects NaN codes."""
    if wb.ndim != 2 or wb.size == 0 or wb.dtype != np.uint8:
        raise FormatError(f"expected a 2-D FP8 weight, got {wb.dtype} {tuple(wb.shape)}", at="dequant")
    check_scale_grid(wb.shape, scale.shape, block)
    check_codes(wb)
    out = np.empty(wb.shape, np.uint16)
    cpu_kernels.fp8_dequant_bf16(np.ascontiguousarray(wb), np.ascontiguousarray(scale, np.float32), int(block[0]),
                                 int(block[1]), E4M3_LUT, out)
    return out
