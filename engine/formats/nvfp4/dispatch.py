"""Pick the NVFP4 kernel for a device: C (else numba) on CPU, Triton or torch on CUDA. Same bytes either way.

`device`: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N". Inputs may live anywhere;
results are host (CPU) tensors: packed uint8 [o, ceil(i/16)·8] and block_scale float8_e4m3fn [o, ceil(i/16)].
"""

from __future__ import annotations

import numpy as np
import torch

from engine.core.errors import FormatError
from engine.formats.device import resolve_device
from engine.formats.fp8_block.helpers import infer_block, scale_to_fp32
from engine.formats.grid import check_scale_values
from engine.formats.nvfp4 import host  # the CPU branches: C / numba kernels on numpy arrays
from engine.formats.nvfp4.helpers import as_scale_2, global_scale
from engine.formats.nvfp4.kernels_cuda import bf16_to_nvfp4_cuda, fp8_block_amax_cuda, fp8_block_to_nvfp4_cuda

__all__ = [
    "bf16_to_nvfp4",
    "float_amax",
    "fp8_block_amax",
    "fp8_block_to_nvfp4",
    "fp8_group_to_nvfp4",
    "resolve_device",
]


def _check_fp8(w_fp8: torch.Tensor, scale: torch.Tensor, block) -> tuple[int, int]:
    if w_fp8.dtype != torch.float8_e4m3fn or w_fp8.dim() != 2 or w_fp8.numel() == 0:
        raise FormatError(
            f"expected a non-empty 2-D float8_e4m3fn weight, got {w_fp8.dtype} {tuple(w_fp8.shape)}",
            at="fp8_block_to_nvfp4",
        )
    blk = infer_block(tuple(w_fp8.shape), tuple(scale.shape)) if block is None else (int(block[0]), int(block[1]))
    return blk


def _scale_np(scale: torch.Tensor) -> np.ndarray:
    s = scale_to_fp32(scale).detach().cpu().contiguous().numpy()
    check_scale_values(s)
    return s


def fp8_block_to_nvfp4(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, scale_2, device: str = "auto", block=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused FP8 block dequant → NVFP4 with the given global scale (bytes == quantize_nvfp4(dequant(...)))."""
    blk = _check_fp8(w_fp8, scale_inv, block)
    dev = resolve_device(device)
    if dev != "cpu":
        _scale_np(scale_inv)  # validates (a small host copy)

        return fp8_block_to_nvfp4_cuda(w_fp8, scale_inv, blk, scale_2, dev)
    s2 = np.float32(as_scale_2(scale_2).item())
    wb = w_fp8.detach().cpu().contiguous().view(torch.uint8).numpy()
    packed, bs = host.fp8_block_to_nvfp4(wb, _scale_np(scale_inv), blk, s2)
    return torch.from_numpy(packed), torch.from_numpy(bs).view(torch.float8_e4m3fn)


def bf16_to_nvfp4(w: torch.Tensor, scale_2, device: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 of a 2-D bf16/fp16/fp32 weight (bytes == quantize_nvfp4(w.float(), scale_2))."""
    if w.dim() != 2 or w.numel() == 0 or not w.is_floating_point():
        raise FormatError(f"expected a non-empty 2-D float weight, got {w.dtype} {tuple(w.shape)}", at="bf16_to_nvfp4")
    dev = resolve_device(device)
    if dev != "cpu":
        return bf16_to_nvfp4_cuda(w, scale_2, dev)
    s2 = np.float32(as_scale_2(scale_2).item())
    packed, bs = host.float_to_nvfp4(w.detach().cpu().to(torch.float32).contiguous().numpy(), s2)
    return torch.from_numpy(packed), torch.from_numpy(bs).view(torch.float8_e4m3fn)


def fp8_block_amax(w_fp8: torch.Tensor, scale_inv: torch.Tensor, device: str = "auto", block=None) -> torch.Tensor:
    """max |dequant(w_fp8, scale)| as a float32 0-d tensor, without materializing the dequantized weight on CPU."""
    blk = _check_fp8(w_fp8, scale_inv, block)
    dev = resolve_device(device)
    if dev != "cpu":
        _scale_np(scale_inv)

        return fp8_block_amax_cuda(w_fp8, scale_inv, blk, dev)
    wb = w_fp8.detach().cpu().contiguous().view(torch.uint8).numpy()
    return torch.tensor(host.fp8_block_amax(wb, _scale_np(scale_inv), blk), dtype=torch.float32)


def float_amax(w: torch.Tensor) -> torch.Tensor:
    """max |w| of a float tensor as float32 0-d (bf16 → fp32 is exact, so this is the dequantized amax)."""
    return w.detach().abs().amax().to(torch.float32).cpu()


def fp8_group_to_nvfp4(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], device: str = "auto", blocks=None
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A fused group (gate/up, w1/w3, ...) of FP8-block weights → NVFP4 with ONE shared weight_scale_2.

    Returns (scale_2 = global_scale(max amax over the group), [(packed, block_scale) per member]); bytes equal
    `quantize_nvfp4(dequant_fp8_block(w, s), scale_2)` member by member. On CUDA each member is uploaded once
    (amax and quantization both read the device copy). `blocks`: one block per member, or None to infer.
    """
    if not pairs:
        raise FormatError("empty fused group", at="fp8_group_to_nvfp4")
    blks = [_check_fp8(w, s, None if blocks is None else blocks[k]) for k, (w, s) in enumerate(pairs)]
    dev = resolve_device(device)
    if dev != "cpu":
        pairs = [(w.to(dev, non_blocking=True), scale_to_fp32(s).to(dev)) for w, s in pairs]
    amax = torch.stack([fp8_block_amax(w, s, device=dev, block=b)
                        for (w, s), b in zip(pairs, blks, strict=True)]).amax()
    s2 = global_scale(amax)
    return s2, [fp8_block_to_nvfp4(w, s, s2, device=dev, block=b) for (w, s), b in zip(pairs, blks, strict=True)]
