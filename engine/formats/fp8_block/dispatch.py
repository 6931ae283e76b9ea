"""Fast FP8 block-128 cast and dequant: numba on CPU, the torch reference on CUDA. Same bytes as helpers.py.

`device`: "auto" | "cpu" | "cuda[:N]" (engine.formats.device.resolve_device). Results are host tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.core.errors import FormatError
from engine.formats.device import resolve_device
from engine.formats.fp8_block import host
from engine.formats.fp8_block.helpers import (
    cast_fp8_block,
    dequant_fp8_block,
    infer_block,
    scale_grid,
    scale_to_fp32,
    scales_from_amax,
)
from engine.formats.fp8_block.host import E4M3_LUT

__all__ = ["cast_fp8_block_fast", "dequant_fp8_block_fast"]


def cast_fp8_block_fast(
    w: torch.Tensor, block: tuple[int, int] = (128, 128), ue8m0: bool = False, device: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`cast_fp8_block` (same bytes), multi-threaded on CPU."""
    dev = resolve_device(device)
    block = (int(block[0]), int(block[1]))
    if dev != "cpu":
        q, s = cast_fp8_block(w.to(dev), block, ue8m0)
        return q.cpu(), s.cpu()
    if w.dim() != 2 or w.numel() == 0 or not w.is_floating_point():
        raise FormatError(f"cast_fp8_block needs a non-empty 2-D float tensor, got {tuple(w.shape)}",
                          at="cast_fp8_block")
    from engine.formats.fp8_block import kernels_cpu
    from engine.formats.numba_setup import KERNEL_LOCK

    x = w.detach().cpu().to(torch.float32).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise FormatError("weight holds inf or NaN", at="cast_fp8_block", hint="fix the source weight first")
    o, i = x.shape
    bo, bi = block
    go, gi = scale_grid((o, i), block)
    xn = x.numpy()
    rows = np.zeros((go * bo, gi), np.float32)
    with KERNEL_LOCK:
        kernels_cpu.row_tile_amax_kernel(xn, bi, rows[:o])
    amax = torch.from_numpy(rows.reshape(go, bo, gi).max(axis=1))
    stored, scale32 = scales_from_amax(amax, ue8m0)
    out = np.empty((o, i), np.uint8)
    with KERNEL_LOCK:
        kernels_cpu.cast_kernel(xn, scale32.contiguous().numpy(), bo, bi, out)
    return torch.from_numpy(out).view(torch.float8_e4m3fn), stored


def dequant_fp8_block_fast(
    w_fp8: torch.Tensor, scale: torch.Tensor, block=None, device: str = "auto", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """`dequant_fp8_block` (same values) cast to `dtype` (bf16 rounds once, to nearest even), multi-threaded."""
    if w_fp8.dtype != torch.float8_e4m3fn or w_fp8.dim() != 2 or w_fp8.numel() == 0:
        raise FormatError(f"expected a 2-D float8_e4m3fn weight, got {w_fp8.dtype} {tuple(w_fp8.shape)}", at="dequant")
    blk = infer_block(tuple(w_fp8.shape), tuple(scale.shape)) if block is None else (int(block[0]), int(block[1]))
    dev = resolve_device(device)
    if dev != "cpu":
        return dequant_fp8_block(w_fp8.to(dev), scale.to(dev), blk).to(dtype).cpu()
    wb = w_fp8.detach().cpu().contiguous().view(torch.uint8)
    s = scale_to_fp32(scale).detach().cpu().contiguous()
    if dtype == torch.bfloat16:  # fused: fp32 product rounded to bf16 in the same pass (C, else numba)
        return torch.from_numpy(host.dequant_bf16(wb.numpy(), s.numpy(), blk)).view(torch.bfloat16)
    from engine.formats.fp8_block import kernels_cpu
    from engine.formats.numba_setup import KERNEL_LOCK

    if bool(((wb & 0x7F) == 0x7F).any()):
        raise FormatError("FP8 weight holds NaN codes", at="dequant_fp8_block", hint="the source is corrupt")
    o, i = wb.shape
    out = np.empty((o, i), np.float32)
    with KERNEL_LOCK:
        kernels_cpu.dequant_kernel(wb.numpy(), s.numpy(), blk[0], blk[1], E4M3_LUT, out)
    t = torch.from_numpy(out)
    return t if dtype == torch.float32 else t.to(dtype)

