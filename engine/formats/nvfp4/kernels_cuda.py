"""CUDA NVFP4 path: FP8-block dequant → NVFP4 in one fused Triton pass where Triton is available
(kernels_triton.py), else as vectorized torch ops on the device, in row chunks.

It runs the reference math of helpers.py (modelopt's rules) on the GPU: torch's CUDA float32 division and
multiplication are IEEE round-to-nearest (no fast-math), the e4m3 cast rounds to nearest even, and
searchsorted is exact, so the bytes equal the CPU kernels' (tests marked requires_gpu check that).
Rows are processed in chunks (a multiple of the FP8 tile height) so that a huge tensor needs only a few
hundred MB of device memory. Inputs may already live on the device (a fused group is uploaded once for
its amax and its quantization); results come back to the host. NaN FP8 codes are not checked here (the
CPU path rejects them); DeepSeek checkpoints hold none.
"""

from __future__ import annotations

import torch

from engine.core.errors import FormatError
from engine.formats.e2m1 import e2m1_codes, pack_nibbles
from engine.formats.fp8_block.helpers import scale_to_fp32
from engine.formats.nvfp4.helpers import as_scale_2, block_scales

CHUNK_ELEMS = 1 << 25  # ~32 M elements (128 MiB fp32) per chunk

__all__ = ["bf16_to_nvfp4_cuda", "cuda_available", "fp8_block_amax_cuda", "fp8_block_to_nvfp4_cuda"]


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _row_chunks(o: int, i: int, align: int):
    rows = max(align, (CHUNK_ELEMS // max(i, 1)) // align * align)
    for r0 in range(0, o, rows):
        yield r0, min(o, r0 + rows)


def _dequant_dev(w: torch.Tensor, s32: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp32(code) × fp32(tile scale) on the device; a broadcast view where the tiles are whole."""
    o, i = w.shape
    bo, bi = block
    x = w.to(torch.float32)
    if o % bo == 0 and i % bi == 0:
        return (x.view(o // bo, bo, i // bi, bi) * s32.view(o // bo, 1, i // bi, 1)).view(o, i)
    return x * s32.repeat_interleave(bo, dim=0)[:o].repeat_interleave(bi, dim=1)[:, :i]


def _quantize_dev(x: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """helpers.quantize_nvfp4's math without its host-side checks (the caller validated the inputs)."""
    pad = (-x.shape[-1]) % 16
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    xb = x.view(x.shape[0], -1, 16)
    s8 = block_scales(xb.abs().amax(dim=-1), s2)
    scaled = xb / (s8.to(torch.float32) * s2).unsqueeze(-1)
    return pack_nibbles(e2m1_codes(scaled.view(x.shape))), s8


def _host(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type == "cpu" else t.to("cpu")


def fp8_block_to_nvfp4_cuda(
    w_fp8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], scale_2, device: str = "cuda"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs on the host or already on `device` (then nothing is copied up); results on the host."""
    o, i = w_fp8.shape
    bo = block[0]
    s2 = as_scale_2(scale_2).to(device)
    s32 = scale_to_fp32(scale).to(device)
    from engine.formats.nvfp4 import kernels_triton

    if kernels_triton.available():  # one fused pass, no intermediates: the whole tensor at once
        p, b = kernels_triton.fp8_block_to_nvfp4_triton(w_fp8.to(device, non_blocking=True), s32, block, s2)
        return _host(p), _host(b)
    packed_parts, bs_parts = [], []
    for r0, r1 in _row_chunks(o, i, bo):
        w = w_fp8[r0:r1].to(device, non_blocking=True)
        p, b = _quantize_dev(_dequant_dev(w, s32[r0 // bo : -(-r1 // bo)], block), s2)
        packed_parts.append(_host(p))
        bs_parts.append(_host(b))
    return torch.cat(packed_parts), torch.cat(bs_parts)


def bf16_to_nvfp4_cuda(w: torch.Tensor, scale_2, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    o, i = w.shape
    s2 = as_scale_2(scale_2).to(device)
    packed_parts, bs_parts = [], []
    for r0, r1 in _row_chunks(o, i, 1):
        x = w[r0:r1].to(device, non_blocking=True).float()
        if not bool(torch.isfinite(x).all()):
            raise FormatError("weight holds inf or NaN", at="bf16_to_nvfp4", hint="fix the source weight first")
        p, b = _quantize_dev(x, s2)
        packed_parts.append(_host(p))
        bs_parts.append(_host(b))
    return torch.cat(packed_parts), torch.cat(bs_parts)


def fp8_block_amax_cuda(w_fp8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], device: str = "cuda"):
    o, i = w_fp8.shape
    bo = block[0]
    s32 = scale_to_fp32(scale).to(device)
    best = torch.zeros((), dtype=torch.float32, device=device)
    for r0, r1 in _row_chunks(o, i, bo):
        x = _dequant_dev(w_fp8[r0:r1].to(device, non_blocking=True), s32[r0 // bo : -(-r1 // bo)], block)
        best = torch.maximum(best, x.abs().amax())
    return best.cpu()
