"""One fused Triton pass on CUDA: FP8 bytes + tile scales → NVFP4 packed codes and e4m3 block scales.

Same float32 operations as the reference (modelopt's): products with IEEE multiplication, quotients with
`div_rn` (correctly rounded; Triton's plain `/` is approximate), the e4m3 cast round-to-nearest-even, the
E2M1 rule as a sum of comparisons (ties to even, saturating at 6), sign = x < 0, element 0 in the low nibble.
Used by kernels_cuda when Triton imports (QUANTDECK_NO_TRITON=1 turns it off); tests compare its bytes with
the CPU kernels on a GPU.
"""

from __future__ import annotations

import torch

from engine.core.settings import settings

try:  # Triton ships with CUDA builds of torch; CPU-only installs lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["available", "fp8_block_to_nvfp4_triton"]

BLOCK_R = 16
BLOCK_C = 128


def available() -> bool:
    return triton is not None and not settings().no_triton


if triton is not None:

    @triton.jit
    def _fp8_to_nvfp4(
        w_ptr, s_ptr, s2_ptr, packed_ptr, bs_ptr, o, i, gi, bo, bi, pcols, nb,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        rmask = rows < o
        mask = rmask[:, None] & (cols[None, :] < i)
        byte = tl.load(w_ptr + rows[:, None].to(tl.int64) * i + cols[None, :], mask=mask, other=0)
        code = byte.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        sc = tl.load(s_ptr + (rows[:, None] // bo) * gi + cols[None, :] // bi, mask=mask, other=0.0)
        x = code * sc
        xb = tl.reshape(x, (BLOCK_R, BLOCK_C // 16, 16))
        amax = tl.max(tl.abs(xb), axis=2)
        s2 = tl.load(s2_ptr)
        s = tl.math.div_rn(amax, s2 * 6.0)
        s = tl.where(s == 0.0, 1.0, s)
        s = tl.minimum(tl.maximum(s, 0.001953125), 448.0)
        s8 = s.to(tl.float8e4nv, fp_downcast_rounding="rtne")
        denom = s8.to(tl.float32) * s2
        q = tl.math.div_rn(xb, tl.broadcast_to(denom[:, :, None], (BLOCK_R, BLOCK_C // 16, 16)))
        a = tl.abs(q)
        m = (
            (a > 0.25).to(tl.uint8)
            + (a >= 0.75).to(tl.uint8)
            + (a > 1.25).to(tl.uint8)
            + (a >= 1.75).to(tl.uint8)
            + (a > 2.5).to(tl.uint8)
            + (a >= 3.5).to(tl.uint8)
            + (a > 5.0).to(tl.uint8)
        )
        m = tl.where(a != a, 7, m).to(tl.uint8)  # NaN (0/0, a divisor that underflowed): 7, as the reference
        m = m | tl.where(q < 0.0, 8, 0).to(tl.uint8)
        lo, hi = tl.split(tl.reshape(m, (BLOCK_R, BLOCK_C // 2, 2)))
        packed = lo | (hi << 4)
        pc = pid_c * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
        tl.store(packed_ptr + rows[:, None].to(tl.int64) * pcols + pc[None, :], packed,
                 mask=rmask[:, None] & (pc[None, :] < pcols))
        bc = pid_c * (BLOCK_C // 16) + tl.arange(0, BLOCK_C // 16)
        tl.store(bs_ptr + rows[:, None].to(tl.int64) * nb + bc[None, :], s8.to(tl.uint8, bitcast=True),
                 mask=rmask[:, None] & (bc[None, :] < nb))


def fp8_block_to_nvfp4_triton(
    w_fp8: torch.Tensor, s32: torch.Tensor, block: tuple[int, int], s2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All arguments on one CUDA device (s32 float32 tile scales, s2 float32 0-d); results on that device."""
    o, i = w_fp8.shape
    nb = -(-i // 16)
    pcols = nb * 8
    w = w_fp8.contiguous().view(torch.uint8)
    s = s32.contiguous()
    packed = torch.empty((o, pcols), dtype=torch.uint8, device=w.device)
    bs = torch.empty((o, nb), dtype=torch.uint8, device=w.device)
    grid = (triton.cdiv(o, BLOCK_R), triton.cdiv(i, BLOCK_C))
    _fp8_to_nvfp4[grid](
        w, s, s2.reshape(1).contiguous(), packed, bs, o, i, s.shape[1], block[0], block[1], pcols, nb,
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
    )
    return packed, bs.view(torch.float8_e4m3fn)
