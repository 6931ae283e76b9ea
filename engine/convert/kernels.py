"""Pick the fastest bit-exact kernel available for the converter's hot loops.

The fused FP8-block → NVFP4 kernel is engineer A's (engine.formats.nvfp4: numba on CPU, torch/triton on
CUDA); when it is not importable the converter falls back to the pure-torch reference (dequantize a row
slab, quantize it) — the same bytes, slower. Row slabs keep memory bounded either way.
"""

from __future__ import annotations

import importlib

import torch

from engine.formats.fp8_block.helpers import dequant_fp8_block, scale_to_fp32
from engine.formats.nvfp4.helpers import quantize_nvfp4

ROWS = 512  # rows per slab for the torch reference (a multiple of every FP8 block height we meet)

_E4M3_LUT = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


def _fast(name: str):
    for mod in ("engine.formats.nvfp4.fast", "engine.formats.nvfp4.helpers", "engine.formats.nvfp4"):
        try:
            fn = getattr(importlib.import_module(mod), name, None)
        except ImportError:
            continue
        if fn is not None:
            return fn
    return None


def fp8_block_amax(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """max |fp32(code) · scale| over the tensor, from the codes: |e4m3| is monotonic in its low 7 bits."""
    o, i = w.shape
    bo, bi = block
    mag = w.view(torch.uint8) & 0x7F
    po, pi = (-o) % bo, (-i) % bi
    if po or pi:
        mag = torch.nn.functional.pad(mag, (0, pi, 0, po))
    so, si = mag.shape[0] // bo, mag.shape[1] // bi
    top = mag.view(so, bo, si, bi).amax(dim=(1, 3))
    vals = _E4M3_LUT.to(w.device)[top.long()] * scale_to_fp32(scale).to(w.device)
    return vals.amax()


def fp8_block_to_nvfp4(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], scale_2: torch.Tensor):
    """(packed uint8, block_scale e4m3) of an FP8-block weight quantized with `scale_2`."""
    fast = _fast("fp8_block_to_nvfp4")
    if fast is not None and tuple(block) == (128, 128):
        return fast(w, scale, scale_2, w.device)
    bo = block[0]
    step = max(ROWS // bo, 1) * bo
    packs, scales = [], []
    for r in range(0, w.shape[0], step):
        rows = w[r:r + step]
        s = scale[r // bo:(r + rows.shape[0] + bo - 1) // bo]
        p, b = quantize_nvfp4(dequant_fp8_block(rows, s, block), scale_2)
        packs.append(p)
        scales.append(b)
    return torch.cat(packs), torch.cat(scales)


def quantize_rows(w32: torch.Tensor, scale_2: torch.Tensor):
    """quantize_nvfp4 over row slabs (same bytes, bounded temporaries)."""
    fast = _fast("quantize_nvfp4_fast")
    if fast is not None:
        return fast(w32, scale_2)
    if w32.shape[0] <= ROWS or w32.is_cuda:
        return quantize_nvfp4(w32, scale_2)
    packs, scales = [], []
    for r in range(0, w32.shape[0], ROWS):
        p, b = quantize_nvfp4(w32[r:r + ROWS], scale_2)
        packs.append(p)
        scales.append(b)
    return torch.cat(packs), torch.cat(scales)
