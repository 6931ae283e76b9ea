"""CUDA NVFP4 path: FP8-block dequant → NVFP4 as vectorized torch ops on the device, in row chunks.

It runs the reference math of helpers.py (modelopt's rules) on the GPU: torch's CUDA float32 division and
multiplication are IEEE round-to-nearest (no fast-math), the e4m3 cast rounds to nearest even, and
searchsorted is exact, so the bytes equal the CPU kernels' (tests marked requires_gpu check that).
Rows are processed in chunks (a multiple of the FP8 tile height) so that a huge tensor needs only a few
hundred MB of device memory. Results come back to the host.
"""

from __future__ import annotations

import torch

from engine.formats.fp8_block.helpers import dequant_fp8_block, scale_to_fp32
from engine.formats.nvfp4.helpers import as_scale_2, quantize_nvfp4

CHUNK_ELEMS = 1 << 25  # ~32 M elements (128 MiB fp32) per chunk

__all__ = ["bf16_to_nvfp4_cuda", "cuda_available", "fp8_block_amax_cuda", "fp8_block_to_nvfp4_cuda"]


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _row_chunks(o: int, i: int, align: int):
    rows = max(align, (CHUNK_ELEMS // max(i, 1)) // align * align)
    for r0 in range(0, o, rows):
        yield r0, min(o, r0 + rows)


def fp8_block_to_nvfp4_cuda(
    w_fp8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], scale_2, device: str = "cuda"
) -> tuple[torch.Tensor, torch.Tensor]:
    o, i = w_fp8.shape
    bo = block[0]
    s2 = as_scale_2(scale_2).to(device)
    s32 = scale_to_fp32(scale).to(device)
    packed_parts, bs_parts = [], []
    for r0, r1 in _row_chunks(o, i, bo):
        w = w_fp8[r0:r1].to(device, non_blocking=True)
        x = dequant_fp8_block(w, s32[r0 // bo : -(-r1 // bo)], block)
        p, b = quantize_nvfp4(x, s2)
        packed_parts.append(p.cpu())
        bs_parts.append(b.cpu())
    return torch.cat(packed_parts), torch.cat(bs_parts)


def bf16_to_nvfp4_cuda(w: torch.Tensor, scale_2, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    o, i = w.shape
    s2 = as_scale_2(scale_2).to(device)
    packed_parts, bs_parts = [], []
    for r0, r1 in _row_chunks(o, i, 1):
        p, b = quantize_nvfp4(w[r0:r1].to(device, non_blocking=True).float(), s2)
        packed_parts.append(p.cpu())
        bs_parts.append(b.cpu())
    return torch.cat(packed_parts), torch.cat(bs_parts)


def fp8_block_amax_cuda(w_fp8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], device: str = "cuda"):
    o, i = w_fp8.shape
    bo = block[0]
    s32 = scale_to_fp32(scale).to(device)
    best = torch.zeros((), dtype=torch.float32, device=device)
    for r0, r1 in _row_chunks(o, i, bo):
        x = dequant_fp8_block(w_fp8[r0:r1].to(device, non_blocking=True), s32[r0 // bo : -(-r1 // bo)], block)
        best = torch.maximum(best, x.abs().amax())
    return best.cpu()
