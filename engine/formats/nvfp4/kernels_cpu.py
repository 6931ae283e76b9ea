"""Fast multi-threaded CPU NVFP4 kernels (numba), bit-exact with the torch reference in helpers.py.

Why numba: on a 2-core machine vectorized torch tops out near `fp8_to_nvfp4_streaming.py`'s ~40 MB/s (every
elementwise step is a full pass over memory), torch.compile reached ~70 MB/s; one fused compiled loop that reads
each FP8 byte once and writes each nibble once is an order of magnitude faster (see benchmarks/nvfp4_kernels.py).

Kernels (all take numpy views of torch tensors, no copies), each as a parallel `*_kernel` (rows over every
core: one big weight at a time) and a `*_serial` twin on the calling thread (one weight per converter thread:
engine.formats.numba_setup says when), both around one shared row body:
  * fp8 block dequant → NVFP4 in one pass: decode code via a 256-entry LUT, × tile scale (fp32), per
    16-block amax, e4m3 block scale, E2M1 codes, packing.
  * float32 → NVFP4 (bf16 goes through an exact `.float()` first).
  * amax of dequantized FP8 without dequantizing: the max |code| per tile (the magnitude byte `b & 0x7F`
    orders e4m3 values) times the tile scale — equal to `dequant(w).abs().amax()` because rounding is monotone.
Every float op is the same float32 op, in the same order, as the reference (modelopt's), so bytes match.

Compiled code is cached on disk (`cache=True`) under NUMBA_CACHE_DIR (engine/formats/numba_setup.py).
error_model="numpy": a division by zero gives inf / NaN as in torch, not Python's ZeroDivisionError.
"""

from __future__ import annotations

import numpy as np

from engine.formats.numba_setup import njit, prange

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_F6 = np.float32(6.0)
_SMIN = np.float32(2.0**-9)
_SMAX = np.float32(448.0)
_B0, _B1, _B2, _B3 = np.float32(0.25), np.float32(0.75), np.float32(1.25), np.float32(1.75)
_B4, _B5, _B6 = np.float32(2.5), np.float32(3.5), np.float32(5.0)


@njit(cache=True, inline="always", error_model="numpy")
def _e2m1(x):
    """E2M1 code of a float32 (modelopt rule: ties to even, saturating at 6, sign = x < 0)."""
    a = abs(x)
    m = (
        np.uint8(a > _B0)
        + np.uint8(a >= _B1)
        + np.uint8(a > _B2)
        + np.uint8(a >= _B3)
        + np.uint8(a > _B4)
        + np.uint8(a >= _B5)
        + np.uint8(a > _B6)
    )
    if a != a:  # NaN (0/0: a block divisor that underflowed, subnormal weights): 7, as the reference's searchsorted
        m = np.uint8(7)
    if x < _F0:
        m |= np.uint8(8)
    return m


@njit(cache=True, inline="always", error_model="numpy")
def _e4m3_code(u, s):
    """e4m3 code of a block scale s (a float32 in [2^-9, 448]) from its bits u: round to nearest even to 3
    mantissa bits above 2^-6, rint(s·512) subnormal steps below."""
    sub = np.uint8(np.rint(s * np.float32(512.0)))
    nor = np.uint8(((u + np.uint32(0x7FFFF) + ((u >> np.uint32(20)) & np.uint32(1))) >> np.uint32(20)) - np.uint32(960))
    return sub if u < np.uint32(0x3C800000) else nor


@njit(cache=True, inline="always", error_model="numpy")
def _quant_block(buf, codes, sb, sbits, amax, s2, six_s2, lut, packed, bs, r, b):
    """Block scale and packed codes of one 16-block held in buf (float32, zero-padded).

    sb/sbits: a 1-element float32 scratch and its uint32 view, to round s to e4m3 on its bits (_e4m3_code).
    """
    s = amax / six_s2
    if s == _F0:
        s = _F1
    if s < _SMIN:
        s = _SMIN
    if s > _SMAX:
        s = _SMAX
    sb[0] = s
    code = _e4m3_code(sbits[0], s)
    bs[r, b] = code
    denom = lut[code] * s2
    for j in range(16):
        codes[j] = _e2m1(buf[j] / denom)
    for j in range(8):
        packed[r, b * 8 + j] = codes[2 * j] | (codes[2 * j + 1] << np.uint8(4))


@njit(cache=True, inline="always", error_model="numpy")
def _fp8_row(wb, sc, r, bo, bi, s2, six_s2, lut, packed, bs, bad, xf, cd, den, sarr, sbits):
    """Row r of fp8_block_to_nvfp4 (xf, cd, den, sarr/sbits: the row's scratch, nb·16 / nb long).

    In passes that each compile to straight vector loops (~30% faster than one fused loop per 16-block):
    dequantize the row (lut[byte] × tile scale, fp32), block amax, block scales (e4m3 on the bits), E2M1
    codes, packing."""
    i = wb.shape[1]
    nb = (i + 15) // 16
    srow = r // bo
    mb = np.uint8(0)
    for c in range(i):
        mb = max(mb, wb[r, c] & np.uint8(0x7F))
    if mb == 0x7F:
        bad[r] = 1
    for t in range((i + bi - 1) // bi):
        sv = sc[srow, t]
        for c in range(t * bi, min(i, (t + 1) * bi)):
            xf[c] = lut[wb[r, c]] * sv
    for c in range(i, nb * 16):
        xf[c] = _F0
    for b in range(nb):
        amax = _F0
        for j in range(16):
            amax = max(amax, abs(xf[b * 16 + j]))
        s = amax / six_s2
        s = _F1 if s == _F0 else s
        s = max(s, _SMIN)
        sarr[b] = min(s, _SMAX)
    for b in range(nb):
        code = _e4m3_code(sbits[b], sarr[b])
        bs[r, b] = code
        den[b] = lut[code] * s2
    for b in range(nb):
        d = den[b]
        for j in range(16):
            cd[b * 16 + j] = _e2m1(xf[b * 16 + j] / d)
    for k in range(nb * 8):
        packed[r, k] = cd[2 * k] | (cd[2 * k + 1] << np.uint8(4))


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def fp8_block_to_nvfp4_kernel(wb, sc, bo, bi, s2, lut, packed, bs, bad):
    """wb uint8 [o, i] fp8 bytes, sc float32 tile scales, s2 float32; writes packed, bs (uint8), bad[r] on NaN.
    Rows in parallel (every core on one weight). Same float32 ops as the reference, so the same bytes."""
    o, i = wb.shape
    nb = (i + 15) // 16
    six_s2 = _F6 * s2
    for r in prange(o):
        xf = np.empty(nb * 16, np.float32)
        cd = np.empty(nb * 16, np.uint8)
        den = np.empty(nb, np.float32)
        sarr = np.empty(nb, np.float32)
        _fp8_row(wb, sc, r, bo, bi, s2, six_s2, lut, packed, bs, bad, xf, cd, den, sarr, sarr.view(np.uint32))


@njit(cache=True, nogil=True, error_model="numpy")
def fp8_block_to_nvfp4_serial(wb, sc, bo, bi, s2, lut, packed, bs, bad):
    """fp8_block_to_nvfp4_kernel on the calling thread alone (one weight per thread: see numba_setup)."""
    o, i = wb.shape
    nb = (i + 15) // 16
    six_s2 = _F6 * s2
    xf = np.empty(nb * 16, np.float32)
    cd = np.empty(nb * 16, np.uint8)
    den = np.empty(nb, np.float32)
    sarr = np.empty(nb, np.float32)
    sbits = sarr.view(np.uint32)
    for r in range(o):
        _fp8_row(wb, sc, r, bo, bi, s2, six_s2, lut, packed, bs, bad, xf, cd, den, sarr, sbits)


@njit(cache=True, inline="always", error_model="numpy")
def _fp32_row(w, r, s2, six_s2, lut, packed, bs, buf, codes, sb, sbits):
    i = w.shape[1]
    for b in range((i + 15) // 16):
        c0 = b * 16
        n = min(16, i - c0)
        amax = _F0
        for j in range(16):
            v = w[r, c0 + j] if j < n else _F0
            buf[j] = v
            amax = max(amax, abs(v))
        _quant_block(buf, codes, sb, sbits, amax, s2, six_s2, lut, packed, bs, r, b)


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def fp32_to_nvfp4_kernel(w, s2, lut, packed, bs):
    """w float32 [o, i] (finite), s2 float32; writes packed and bs (uint8). Rows in parallel."""
    six_s2 = _F6 * s2
    for r in prange(w.shape[0]):
        buf = np.zeros(16, np.float32)
        codes = np.zeros(16, np.uint8)
        sb = np.zeros(1, np.float32)
        _fp32_row(w, r, s2, six_s2, lut, packed, bs, buf, codes, sb, sb.view(np.uint32))


@njit(cache=True, nogil=True, error_model="numpy")
def fp32_to_nvfp4_serial(w, s2, lut, packed, bs):
    """fp32_to_nvfp4_kernel on the calling thread alone."""
    six_s2 = _F6 * s2
    buf = np.zeros(16, np.float32)
    codes = np.zeros(16, np.uint8)
    sb = np.zeros(1, np.float32)
    sbits = sb.view(np.uint32)
    for r in range(w.shape[0]):
        _fp32_row(w, r, s2, six_s2, lut, packed, bs, buf, codes, sb, sbits)


@njit(cache=True, inline="always", error_model="numpy")
def _tile_max(wb, tr, bo, bi, out, acc):
    """out[tr, :]: first the element-wise max of |byte| down the tile row's rows (long vector loops), then
    over each bi-wide slice."""
    o, i = wb.shape
    acc[:] = 0
    for r in range(tr * bo, min(o, (tr + 1) * bo)):
        for c in range(i):
            v = wb[r, c] & np.uint8(0x7F)
            acc[c] = v if v > acc[c] else acc[c]
    for t in range(out.shape[1]):
        m = np.uint8(0)
        for c in range(t * bi, min(i, (t + 1) * bi)):
            m = max(m, acc[c])
        out[tr, t] = m


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def fp8_tile_max_kernel(wb, bo, bi, out):
    """out[tr, t] = max magnitude byte (b & 0x7F) of fp8 bytes wb over the bo×bi tile (tr, t). Tile rows in
    parallel."""
    for tr in prange(out.shape[0]):
        _tile_max(wb, tr, bo, bi, out, np.empty(wb.shape[1], np.uint8))


@njit(cache=True, nogil=True, error_model="numpy")
def fp8_tile_max_serial(wb, bo, bi, out):
    """fp8_tile_max_kernel on the calling thread alone."""
    acc = np.empty(wb.shape[1], np.uint8)
    for tr in range(out.shape[0]):
        _tile_max(wb, tr, bo, bi, out, acc)
