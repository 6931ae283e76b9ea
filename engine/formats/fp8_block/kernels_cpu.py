"""numba kernels for DeepSeek FP8 block-128 on CPU: tile amax, cast to e4m3 codes, dequant to fp32.

Bit-exact with engine/formats/fp8_block/helpers.py: the same float32 division / multiplication, e4m3
round-to-nearest-even with the sign of the quotient kept (-0.0 → 0x80), clamp to ±448 first.
"""

from __future__ import annotations

import numpy as np

from engine.formats.numba_setup import njit, prange

_F448 = np.float32(448.0)


@njit(parallel=True, cache=True)
def row_tile_amax_kernel(x, bi, out):
    """out[r, t] = max |x[r, c]| over column tile t (width bi); x float32 [o, i]."""
    o, i = x.shape
    gi = (i + bi - 1) // bi
    for r in prange(o):
        for t in range(gi):
            m = np.float32(0.0)
            for c in range(t * bi, min(i, (t + 1) * bi)):
                m = max(m, abs(x[r, c]))
            out[r, t] = m


@njit(parallel=True, cache=True)
def cast_kernel(x, s32, bo, bi, out):
    """out[r, c] = e4m3 byte of clamp(x[r, c] / s32[tile], ±448); x float32, s32 float32 tile scales.

    Normal range: round-to-nearest-even on the float32 bits (add 0x7FFFF + lsb, keep 3 mantissa bits; a
    mantissa carry bumps the exponent); below 2^-6: k = rint(|v|·512) subnormal steps (k = 8 is code 8).
    """
    o, i = x.shape
    gi = (i + bi - 1) // bi
    for r in prange(o):
        tr = r // bo
        tmp = np.empty(bi, np.float32)
        bits = tmp.view(np.uint32)
        for t in range(gi):
            sv = s32[tr, t]
            c0 = t * bi
            n = min(i, c0 + bi) - c0
            for j in range(n):
                v = x[r, c0 + j] / sv
                tmp[j] = min(max(v, -_F448), _F448)
            for j in range(n):
                u = bits[j]
                a = u & np.uint32(0x7FFFFFFF)
                if a < np.uint32(0x3C800000):  # |v| < 2^-6
                    code = np.uint32(np.rint(abs(tmp[j]) * np.float32(512.0)))
                else:
                    code = (((a + np.uint32(0x7FFFF) + ((a >> np.uint32(20)) & np.uint32(1))) >> np.uint32(20))
                            - np.uint32(960))
                out[r, c0 + j] = np.uint8(code | ((u >> np.uint32(24)) & np.uint32(0x80)))


@njit(parallel=True, cache=True)
def dequant_kernel(wb, sc, bo, bi, lut, out):
    """out[r, c] = lut[wb[r, c]] × sc[tile] in float32 (NaN codes decode to NaN; callers check)."""
    o, i = wb.shape
    gi = (i + bi - 1) // bi
    for r in prange(o):
        tr = r // bo
        for t in range(gi):
            sv = sc[tr, t]
            for c in range(t * bi, min(i, (t + 1) * bi)):
                out[r, c] = lut[wb[r, c]] * sv


@njit(cache=True, inline="always")
def _bf16_row(wb, sc, r, bo, bi, lut, out, tmp, bits):
    """Row r of dequant_bf16 (tmp: bi float32 of scratch, bits: its uint32 view)."""
    i = wb.shape[1]
    tr = r // bo
    for t in range((i + bi - 1) // bi):
        sv = sc[tr, t]
        c0 = t * bi
        n = min(i, c0 + bi) - c0
        for j in range(n):
            tmp[j] = lut[wb[r, c0 + j]] * sv
        for j in range(n):
            u = bits[j]
            out[r, c0 + j] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(parallel=True, cache=True, nogil=True)
def dequant_bf16_kernel(wb, sc, bo, bi, lut, out):
    """out[r, c] = bf16 bits of fp32(lut[wb[r, c]] × sc[tile]), rounded to nearest even (no NaN inputs).
    Rows in parallel."""
    for r in prange(wb.shape[0]):
        tmp = np.empty(bi, np.float32)
        _bf16_row(wb, sc, r, bo, bi, lut, out, tmp, tmp.view(np.uint32))


@njit(cache=True, nogil=True)
def dequant_bf16_serial(wb, sc, bo, bi, lut, out):
    """dequant_bf16_kernel on the calling thread alone (engine.formats.numba_setup.run_kernel)."""
    tmp = np.empty(bi, np.float32)
    bits = tmp.view(np.uint32)
    for r in range(wb.shape[0]):
        _bf16_row(wb, sc, r, bo, bi, lut, out, tmp, bits)
