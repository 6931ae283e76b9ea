"""NVFP4 numerics in pure torch — the reference every fast kernel is tested against. It imports no kernel: the
fast paths (engine.formats.nvfp4.dispatch) import it (an import-linter contract in pyproject.toml).

Bit-exact with modelopt's `NVFP4QTensor.quantize(w_fp32, 16, weights_scaling_factor_2=scale_2)`:
  * `scale_2 = amax / (6·448)` in float32 (`global_scale`); amax is taken from the dequantized fp32 values.
  * per 16-element block along the last dim: `s = fp32(block_amax) / fp32(6·scale_2)`, `s == 0 → 1`,
    clamp to [2^-9, 448], cast to float8_e4m3fn (round to nearest even);
  * elements: `x / fp32(fp32(s_e4m3) · scale_2)` rounded to E2M1 (engine.formats.e2m1: ties to even,
    saturating at 6, sign = x < 0), packed two per byte, element 0 in the low nibble.
  * A last partial 16-block is zero-padded as modelopt pads it: the packed tensor then has
    ceil(i/16)·8 columns; `dequant_nvfp4(..., shape=)` cuts the padding off again.
Edge decisions (DESIGN "Numerics"):
  * all-zero tensor (amax == 0, where modelopt divides by zero and writes NaN scales): `scale_2 = 1.0`,
    every block scale 1.0, codes 0 — decodes to exact zeros. The same 1.0 is used when amax/2688
    underflows float32 to 0.
  * scale_2 must be finite and > 0 (FormatError otherwise); non-finite weights are rejected.
Decoding (modelopt's `dequantize`): `e2m1(code) × fp32(fp32(s_e4m3) × scale_2)`, in float32.
"""

from __future__ import annotations

import torch

from engine.core.errors import FormatError
from engine.formats.e2m1 import E2M1_MAX, decode_packed, e2m1_codes, pack_nibbles
from engine.formats.grid import E4M3_MAX, packed_cols
from engine.formats.grid import NVFP4_BLOCK as BLOCK

E4M3_MIN_SCALE = 2.0**-9

__all__ = [
    "BLOCK",
    "as_scale_2",
    "block_scales",
    "dequant_nvfp4",
    "global_scale",
    "packed_cols",
    "quantize_nvfp4",
    "weight_amax",
]


def weight_amax(*tensors: torch.Tensor) -> torch.Tensor:
    """max |x| over one tensor or a fused group (float32 0-d)."""
    return torch.stack([t.detach().abs().amax().to(torch.float32) for t in tensors]).amax()


def global_scale(amax: float | torch.Tensor) -> torch.Tensor:
    """`weight_scale_2` = amax / (6·448) as a float32 0-d tensor; 1.0 for a zero amax."""
    a = torch.as_tensor(amax, dtype=torch.float32).reshape(())
    if not bool(torch.isfinite(a)) or float(a) < 0:
        raise FormatError(f"amax must be finite and >= 0, got {float(a)}", at="global_scale", hint="check the weights")
    s = a / (E2M1_MAX * E4M3_MAX)
    return torch.where(s > 0, s, torch.ones_like(s))


def as_scale_2(scale_2: float | torch.Tensor) -> torch.Tensor:
    """Validate and normalize a global scale to a float32 0-d tensor on the CPU."""
    s = torch.as_tensor(scale_2, dtype=torch.float32).detach().cpu().reshape(())
    if not bool(torch.isfinite(s)) or float(s) <= 0:
        raise FormatError(
            f"weight_scale_2 must be finite and > 0, got {float(s)}",
            at="scale_2",
            hint="compute it with global_scale(amax)",
        )
    return s


def block_scales(block_amax: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn block scales from float32 block amax, exactly as modelopt computes them."""
    s = block_amax.to(torch.float32) / (E2M1_MAX * scale_2.to(block_amax.device))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return s.clamp(min=E4M3_MIN_SCALE, max=E4M3_MAX).to(torch.float8_e4m3fn)


def _pad_blocks(x: torch.Tensor) -> torch.Tensor:
    pad = (-x.shape[-1]) % BLOCK
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def quantize_nvfp4(w: torch.Tensor, scale_2: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize along the last dim. Returns (packed uint8 [..., ceil(i/16)·8], block_scale e4m3 [..., ceil(i/16)])."""
    if w.dim() < 1 or w.numel() == 0:
        raise FormatError(f"cannot quantize a tensor of shape {tuple(w.shape)}", at="quantize_nvfp4")
    s2 = as_scale_2(scale_2).to(w.device)
    x = _pad_blocks(w.to(torch.float32))
    if not bool(torch.isfinite(x).all()):
        raise FormatError("weight holds inf or NaN", at="quantize_nvfp4", hint="fix the source weight first")
    xb = x.view(*x.shape[:-1], -1, BLOCK)
    s8 = block_scales(xb.abs().amax(dim=-1), s2)
    scaled = xb / (s8.to(torch.float32) * s2).unsqueeze(-1)
    codes = e2m1_codes(scaled.view(x.shape))
    return pack_nibbles(codes), s8


def blocks_times(packed: torch.Tensor, per_block: torch.Tensor) -> torch.Tensor:
    """float32 values [..., 2n] of E2M1 bytes `packed` (uint8 [..., n]), each 16-value block times its float32
    factor in `per_block` [..., 2n/16] (block scale × scale_2): one product, one rounding."""
    cols = 2 * packed.shape[-1]
    vals = decode_packed(packed).view(*packed.shape[:-1], cols // BLOCK, BLOCK) * per_block.unsqueeze(-1)
    return vals.view(*packed.shape[:-1], cols)


def dequant_nvfp4(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    scale_2: float | torch.Tensor,
    shape: tuple[int, ...] | torch.Size | None = None,
) -> torch.Tensor:
    """float32 values of an NVFP4 tensor; `shape` (the original, unpadded shape) cuts the block padding."""
    packed = packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed  # bytes, as stored
    cols = 2 * packed.shape[-1]
    nb = cols // BLOCK
    if cols % BLOCK or tuple(block_scale.shape) != (*packed.shape[:-1], nb):
        raise FormatError(
            f"block scale {tuple(block_scale.shape)} does not fit packed weight {tuple(packed.shape)}",
            at="dequant_nvfp4",
            hint="expected block_scale [..., packed_cols*2/16]",
        )
    s2 = as_scale_2(scale_2).to(packed.device)
    vals = blocks_times(packed, block_scale.to(torch.float32) * s2)
    if shape is not None:
        shape = tuple(shape)
        if shape[:-1] != tuple(packed.shape[:-1]) or not 0 < shape[-1] <= cols:
            raise FormatError(f"shape {shape} does not fit packed weight {tuple(packed.shape)}", at="dequant_nvfp4")
        vals = vals[..., : shape[-1]]
    return vals

