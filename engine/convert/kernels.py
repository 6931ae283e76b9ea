"""The converter's hot loops, delegated to engineer A's kernels (engine.formats.nvfp4.dispatch: numba on CPU,
torch on CUDA; bytes identical to the torch reference). Results are CPU tensors.

Why numba on CPU: on 2 cores the bit-exact vectorized torch path measured ~38 MB/s of FP8 input (the peer's
speed), while the fused numba kernel (dequant + block amax + E2M1 rounding + packing in one pass, no
temporaries) runs at 600-950 MB/s: the conversion becomes I/O bound.
"""

from __future__ import annotations

import torch

from engine.formats.nvfp4 import dispatch


def _dev(device: torch.device | str) -> str:
    d = torch.device(device)
    return "cpu" if d.type == "cpu" else (f"cuda:{d.index}" if d.index is not None else "cuda")


def fp8_block_amax(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """max |fp32(code) · scale| of an FP8-block weight, without materializing it."""
    return dispatch.fp8_block_amax(w, scale, _dev(device), block=block)


def fp8_block_to_nvfp4(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], scale_2: torch.Tensor,
                       device: torch.device | str = "cpu"):
    """(packed uint8, block_scale e4m3) of an FP8-block weight quantized with `scale_2` (fused, one pass)."""
    return dispatch.fp8_block_to_nvfp4(w, scale, scale_2, _dev(device), block=block)


def float_to_nvfp4(w: torch.Tensor, scale_2: torch.Tensor, device: torch.device | str = "cpu"):
    """(packed uint8, block_scale e4m3) of a 2-D float weight."""
    return dispatch.bf16_to_nvfp4(w, scale_2, _dev(device))
